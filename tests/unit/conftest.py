"""Fixtures shared by unit tests: the GGML export and imatrix models, a calibrated tiny Llama."""

from __future__ import annotations

import pytest

from q2lab.export.gguf import export_gguf
from tests.tiny import make_tiny_model


@pytest.fixture(scope="module")
def tiny256():
    """Rows of 256 and 512 so K and IQ2 types apply (a 64-wide model would fall back everywhere)."""
    return make_tiny_model(hidden_size=256, intermediate_size=512, num_hidden_layers=2, seed=3)


@pytest.fixture(scope="module")
def f32_file(tiny256, tmp_path_factory):
    """``tiny256`` exported as an F32 GGUF: the input llama.cpp's quantizer gets in the oracles."""
    path = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    export_gguf(tiny256, path, "F32")
    return path


@pytest.fixture(scope="session")
def tiny_calibrated(tmp_path_factory, tiny_text_file):
    """The tiny Llama (the float teacher: read only) and its Hessians from 8 × 32 windows of the
    tiny text, shared by the method tests that quantize with a store."""
    from q2lab.calib.store import CalibSpec, calibrate

    ref = make_tiny_model("llama")
    spec = CalibSpec(corpus=str(tiny_text_file), windows=8, ctx=32, seed=0)
    return ref, calibrate(ref, spec, root=tmp_path_factory.mktemp("tiny-hessians"))
