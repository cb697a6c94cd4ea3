"""One name for the KV cache across transformers versions.

transformers 5.x renamed the forward argument and output field ``past_key_values`` to ``cache``
(the old name is deprecated and goes away in 5.40); q2lab supports ``transformers>=4.50``, so
callers pass and read the cache through these two helpers instead of naming either spelling.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any


@functools.lru_cache(maxsize=64)
def _cache_arg(forward_cls: type) -> str:
    params = inspect.signature(forward_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for ``model(...)``: ``cache=`` where the model takes it, else
    ``past_key_values=``."""
    return {_cache_arg(type(model)): cache}


def output_cache(out: Any) -> Any:
    """The KV cache a forward pass returned (``out.cache``; before transformers 5
    ``out.past_key_values``)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def reserve(cache: Any, extra_tokens: int) -> Any:
    """Give each plain dynamic layer of ``cache`` room for ``extra_tokens`` more positions, written
    in place, and return the cache.

    transformers' ``DynamicLayer`` appends a step's keys and values with ``torch.cat``, copying
    the whole cache every step, a cost that grows with the context.  A reserved layer keeps one
    buffer and exposes ``keys``/``values`` as views of its filled part, so the attention sees the
    same tensors (bit-identical results) without the copies.  Layers of other kinds (sliding
    windows, quantized caches) and caches of transformers < 5 are left as they are."""
    layers = getattr(cache, "layers", None)
    if not layers or extra_tokens < 1:
        return cache
    from transformers.cache_utils import DynamicLayer

    reserved = _reserved_class()
    for layer in layers:
        plain = type(layer) is DynamicLayer and layer.is_initialized
        if plain and layer.keys is not None and layer.keys.dim() == 4:
            layer.__class__ = reserved
            layer._reserve(extra_tokens)
    return cache


@functools.lru_cache(maxsize=1)
def _reserved_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        """A ``DynamicLayer`` whose keys/values are views of a preallocated buffer."""

        def _reserve(self, extra: int) -> None:
            n = self.keys.shape[-2]
            self._kbuf = _grown(self.keys, n + extra)
            self._vbuf = _grown(self.values, n + extra)
            self._n = n
            self._views()

        def _views(self) -> None:
            self.keys = self._kbuf[:, :, : self._n]
            self.values = self._vbuf[:, :, : self._n]

        def update(self, key_states, value_states, *args, **kwargs):
            n, add = self._n, key_states.shape[-2]
            if n + add > self._kbuf.shape[-2]:  # past the reservation: grow by doubling
                self._kbuf = _grown(self._kbuf[:, :, :n], 2 * (n + add))
                self._vbuf = _grown(self._vbuf[:, :, :n], 2 * (n + add))
            self._kbuf[:, :, n : n + add] = key_states
            self._vbuf[:, :, n : n + add] = value_states
            self._n = n + add
            self._views()
            return self.keys, self.values

        def batch_select_indices(self, indices) -> None:
            self._kbuf, self._vbuf = self._kbuf[indices], self._vbuf[indices]
            self._views()

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove < 0:
                self._n = max(0, self._n + tokens_to_remove)
                self._views()
            else:
                super().crop(tokens_to_remove)

    return ReservedLayer


def _grown(t: Any, length: int) -> Any:
    import torch

    buf = torch.empty((*t.shape[:2], length, t.shape[3]), dtype=t.dtype, device=t.device)
    buf[:, :, : t.shape[2]] = t
    return buf
