"""Model loading (aliases, HF dirs/ids, GGUF, q2lab checkpoints) and structure discovery."""

from q2lab.models.arch import DecoderLayout, find_decoder
from q2lab.models.loader import LoadedModel, ModelInfo, load_model

__all__ = ["DecoderLayout", "LoadedModel", "ModelInfo", "find_decoder", "load_model"]
