"""Evaluation: perplexity, KL divergence to the reference, multiple choice, generation collapse."""
