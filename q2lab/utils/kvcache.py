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
