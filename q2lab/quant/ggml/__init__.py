"""llama.cpp's GGML quantization types, reimplemented bit-exactly and vectorised (issue 4)."""
