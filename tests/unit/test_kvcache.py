"""The reserved KV cache: the same keys, values and tokens as transformers' DynamicLayer, without
a copy of the whole cache per decoded token."""

from __future__ import annotations

import pytest
import torch

from q2lab.eval import generation as gen
from q2lab.utils.kvcache import reserve

DynamicCache = pytest.importorskip("transformers.cache_utils").DynamicCache


def _cache(batch: int = 3, length: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cache = DynamicCache()
    for layer in range(2):
        cache.update(
            torch.randn(batch, 2, length, 4, generator=g),
            torch.randn(batch, 2, length, 4, generator=g),
            layer,
        )
    return cache


def _steps(cache, n: int, seed: int = 1, batch: int = 3):
    g = torch.Generator().manual_seed(seed)
    outs = []
    for _ in range(n):
        for layer in range(2):
            k, v = torch.randn(batch, 2, 1, 4, generator=g), torch.randn(batch, 2, 1, 4, generator=g)
            outs.append(tuple(t.clone() for t in cache.update(k, v, layer)))
    return outs


@pytest.mark.parametrize("extra", [1, 3, 8])  # 1 and 3: growing past the reservation
def test_reserved_layers_return_what_dynamic_layers_return(extra) -> None:
    plain, reserved = _cache(), reserve(_cache(), extra)
    assert type(reserved.layers[0]).__name__ == "ReservedLayer"
    for (k1, v1), (k2, v2) in zip(_steps(plain, 6), _steps(reserved, 6)):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    assert reserved.get_seq_length() == plain.get_seq_length() == 11


def test_no_copy_of_the_cache_while_inside_the_reservation() -> None:
    cache = reserve(_cache(), 16)
    layer = cache.layers[0]
    buf = layer._kbuf.data_ptr()
    _steps(cache, 10)
    assert layer._kbuf.data_ptr() == buf and layer.keys.data_ptr() == buf


def test_batch_select_and_crop_match_dynamic_layers() -> None:
    plain, reserved = _cache(), reserve(_cache(), 8)
    _steps(plain, 2), _steps(reserved, 2)
    keep = torch.tensor([0, 2])
    plain.batch_select_indices(keep), reserved.batch_select_indices(keep)
    plain.crop(-2), reserved.crop(-2)
    for (k1, v1), (k2, v2) in zip(_steps(plain, 3, batch=2), _steps(reserved, 3, batch=2)):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)


def test_generation_tokens_do_not_change(tiny, monkeypatch) -> None:
    prompts = ["The quick brown fox", "A stitch in time saves nine. All that", "Numbers", "zz top"]
    reserved = gen.generate(tiny, prompts, max_new_tokens=16, batch_size=4)
    monkeypatch.setattr(gen, "reserve", lambda cache, n: cache)
    assert gen.generate(tiny, prompts, max_new_tokens=16, batch_size=4) == reserved
