"""q2lab: extreme low-bit LLM quantization with one shared calibration and honest evaluation."""

__version__ = "0.1.0"
