"""Export: q2lab checkpoints (safetensors + manifest); GGUF export lives in gguf.py."""
