"""Shared fixtures: a tiny random Llama built in-process (fast tests) and the packaged
SmolLM2-135M (integration tests, marked ``integration``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.tiny import TINY_TEXT, make_tiny_model

pytest_plugins = ["tests.ci_plugin"]

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_configure(config):
    if not os.environ.get("Q2LAB_DATA") and SHARED_DATA.is_dir():
        os.environ["Q2LAB_DATA"] = str(SHARED_DATA)
    threads = os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(int(threads) if threads else max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny():
    """A LoadedModel wrapping a 2-layer random Llama with a small byte-level BPE tokenizer."""
    return make_tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "corpus.txt"
    p.write_text(TINY_TEXT * 20, encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def smollm2():
    """The packaged SmolLM2-135M-Instruct, fetched and converted once per machine."""
    from q2lab.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_store(smollm2, tmp_path_factory):
    """Hessians of SmolLM2-135M from 16 × 512 WikiText-2 calibration windows, computed once per run."""
    from q2lab.calib.store import CalibSpec, calibrate

    spec = CalibSpec("wikitext2", windows=16, ctx=512, seed=0)
    return calibrate(smollm2, spec, root=tmp_path_factory.mktemp("smollm2-hessians"))


@pytest.fixture()
def data_root() -> Path:
    root = os.environ.get("Q2LAB_DATA")
    if not root or not Path(root).is_dir():
        pytest.skip("Q2LAB_DATA is not set to the staged data folder")
    return Path(root)
