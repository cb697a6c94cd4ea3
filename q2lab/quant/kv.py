"""KV-cache quantization (KIVI, Liu et al. 2024): keys per channel, values per token, a float
window of recent tokens (issue 18, part 3).

Keys have outlier *channels* (a few head dimensions are large for every token), so a key block
is quantized per channel over a group of ``group`` tokens; values have no such structure and
are quantized per token over groups of ``group`` channels.  Both use KIVI's asymmetric grid: the
group's [min, max] in 2^b − 1 steps, step and minimum in fp16 (a weight grid's integer zero point
would force the range to hold 0 and round the offset to a whole step, which costs a 2-bit key
channel with a large constant part most of its levels).  The most recent tokens
stay in float: a layer's float window holds between ``residual`` and ``residual + group − 1``
tokens, and whenever it would exceed that, its oldest ``group`` tokens are quantized as one key
block (and as ``group`` value rows) and leave it.  So attention to the last ``residual`` tokens is
exact, and with ``residual`` at least the sequence length nothing is quantized at all (tested:
the logits then equal the float cache's).

Storage is what :meth:`KIVILayer.nbytes` counts: the packed format's codes at b bits each, an
fp16 step and minimum per group, plus the float window.  This reference path holds one code per byte and
dequantizes the whole quantized part on every update (a fused kernel would read packed codes
inside attention): it measures quality, and its speed is what a CPU without such a kernel gets.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch

from q2lab.errors import ConfigError
from q2lab.models.arch import head_dim_of, kv_head_count, text_config
from q2lab.quant import uniform
from q2lab.utils.packing import packed_nbytes

KV_BITS = (2, 3, 4, 8)


class _Backend(NamedTuple):
    bits: tuple[int, ...]  # the bit widths it implements
    package: str | None  # what `pip install` needs (None: q2lab's own)
    module: str | None  # the import that shows the package is there


# The caches a task can decode through: q2lab's own, and transformers' ``QuantizedCache`` with its
# two backends as peers (the same KIVI layout: keys per channel, values per token, a float window).
KV_BACKENDS: dict[str, _Backend] = {
    "q2lab": _Backend(KV_BITS, None, None),
    "quanto": _Backend((2, 4), "optimum-quanto", "optimum"),
    "hqq": _Backend((1, 2, 3, 4, 8), "hqq", "hqq"),
}


@dataclass(frozen=True)
class KVConfig:
    """``kv: {bits: 2, residual: 128, group: 32, backend: q2lab}`` of a task or study."""

    bits: int = 2
    residual: int = 128
    group: int = 32
    backend: str = "q2lab"

    def __post_init__(self) -> None:
        if self.backend not in KV_BACKENDS:
            raise ConfigError(f"unknown kv.backend {self.backend!r}; known: {', '.join(KV_BACKENDS)}")
        allowed = KV_BACKENDS[self.backend].bits
        if isinstance(self.bits, bool) or self.bits not in allowed:
            raise ConfigError(
                f"kv.bits must be one of {', '.join(map(str, allowed))} with backend {self.backend}, "
                f"got {self.bits!r}"
            )
        for name, least, what in (("residual", 0, "a non-negative"), ("group", 1, "a positive")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ConfigError(f"kv.{name} must be {what} integer, got {v!r}")

    @classmethod
    def parse(cls, value: Any) -> KVConfig | None:
        if value is None or value is False:
            return None
        if not isinstance(value, dict):
            raise ConfigError(f"kv must be a mapping {{bits, residual, group}} or null, got {value!r}")
        unknown = sorted(set(value) - {"bits", "residual", "group", "backend"})
        if unknown:
            raise ConfigError(
                f"unknown kv option(s) {', '.join(unknown)}; known: backend, bits, group, residual"
            )
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        """The options as a task key holds them: the default backend is left out, so tasks
        written before peers existed keep their keys (and their records stay reusable)."""
        d = asdict(self)
        if self.backend == "q2lab":
            del d["backend"]
        return d

    @property
    def native(self) -> bool:
        """q2lab's own cache, whose bytes :func:`cache_nbytes` can count (a peer's it cannot)."""
        return self.backend == "q2lab"


@dataclass
class _Packed:
    """One quantized block, batch first: b-bit codes (held one per byte here) and, per group, an
    fp16 step and an fp16 minimum (the grid's ``x ≈ min + code·step``; the grouped view's last
    dimension is the group)."""

    codes: torch.Tensor  # uint8, (..., groups, group size)
    scales: torch.Tensor  # fp16, (..., groups)
    mins: torch.Tensor  # fp16, (..., groups)
    bits: int

    def nbytes(self) -> int:
        """Bytes of the packed format: codes at ``bits`` each, an fp16 step and minimum per group."""
        return packed_nbytes(self.codes.numel(), self.bits) + 2 * (self.scales.numel() + self.mins.numel())

    def select(self, rows: torch.Tensor) -> _Packed:
        return _Packed(self.codes[rows], self.scales[rows], self.mins[rows], self.bits)


def _quantize_rows(x: torch.Tensor, bits: int) -> _Packed:
    """Quantize the last dimension of ``x`` (…, groups, k) group by group on KIVI's grid: the
    group's own [min, max] in 2^b − 1 steps, the minimum kept in fp16.  Unlike a weight grid the
    range does not have to hold 0, and the offset is not rounded to a whole step: a key channel
    with a large constant part (the reason keys are grouped per channel) keeps all its levels."""
    rows = x.reshape(-1, x.shape[-1]).float()
    maxq = (1 << bits) - 1
    lo = rows.min(dim=1).values.half().float()
    scale = uniform.fp16_round((rows.max(dim=1).values - lo) / maxq)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round((rows - lo[:, None]) / safe[:, None]), 0, maxq).to(torch.uint8)
    lead = tuple(x.shape[:-1])
    return _Packed(codes.view(x.shape), scale.half().view(lead), lo.half().view(lead), bits)


def _dequantize_rows(p: _Packed, dtype: torch.dtype) -> torch.Tensor:
    return (p.mins.float().unsqueeze(-1) + p.codes.float() * p.scales.float().unsqueeze(-1)).to(dtype)


def quantize_keys(keys: torch.Tensor, bits: int) -> _Packed:
    """A block of keys (batch, heads, tokens, dim), one group per channel over its tokens."""
    return _quantize_rows(keys.transpose(-1, -2), bits)  # (B, H, D, T): rows are channels


def dequantize_keys(p: _Packed, dtype: torch.dtype) -> torch.Tensor:
    return _dequantize_rows(p, dtype).transpose(-1, -2)


def quantize_values(values: torch.Tensor, bits: int, group: int) -> _Packed:
    """Values (batch, heads, tokens, dim) per token, over groups of ``group`` channels."""
    b, h, t, d = values.shape
    g = group if d % group == 0 else d  # a head dim the group does not divide: one group per token
    return _quantize_rows(values.reshape(b, h, t, d // g, g), bits)


def dequantize_values(p: _Packed, dtype: torch.dtype) -> torch.Tensor:
    b, h, t, n, g = p.codes.shape
    return _dequantize_rows(p, dtype).reshape(b, h, t, n * g)


def kivi_cache(model: Any, cfg: KVConfig) -> Any:
    """A transformers cache whose layers quantize as configured (full-attention models): q2lab's
    own layers, or transformers' ``QuantizedCache`` when ``cfg.backend`` names a peer."""
    try:
        from transformers.cache_utils import Cache, QuantizedCache
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        raise ConfigError(f"KV-cache quantization needs transformers' Cache ({e})") from e
    text = text_config(model)
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise ConfigError(
            f"KV-cache quantization supports full-attention models only; this one has {sorted(kinds)} layers"
        )
    if not cfg.native:
        _require_backend(cfg.backend)
        return QuantizedCache(
            backend=cfg.backend,
            config=model.config,
            nbits=cfg.bits,
            residual_length=cfg.residual,
            q_group_size=cfg.group,
        )
    layer_cls = _layer_class()
    return Cache(layers=[layer_cls(cfg) for _ in range(text.num_hidden_layers)])


def _require_backend(backend: str) -> None:
    spec = KV_BACKENDS[backend]
    if importlib.util.find_spec(spec.module) is None:
        raise ConfigError(
            f"kv.backend {backend} needs the {spec.package} package (pip install {spec.package})"
        )


def float_bytes_per_token(model: Any) -> float:
    """What an unquantized cache holds per token: keys and values of every layer, in the
    model's dtype."""
    cfg = text_config(model)
    dtype_bytes = next(model.parameters()).element_size()
    return float(2 * cfg.num_hidden_layers * kv_head_count(cfg) * head_dim_of(model) * dtype_bytes)


def cache_nbytes(cache: Any) -> int:
    """Bytes a cache holds for its keys and values (quantized blocks + float windows)."""
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "nbytes"):
            total += layer.nbytes()
        elif getattr(layer, "keys", None) is not None:
            total += (
                layer.keys.numel() * layer.keys.element_size()
                + layer.values.numel() * layer.values.element_size()
            )
    return total


_LAYER: list[type] = []


def _layer_class() -> type:
    """The cache layer class, built on first use (it subclasses transformers' DynamicLayer)."""
    if _LAYER:
        return _LAYER[0]
    from transformers.cache_utils import DynamicLayer

    class KIVILayer(DynamicLayer):
        """One layer's KIVI cache: quantized key blocks and value rows, then the float window."""

        is_croppable = False

        def __init__(self, cfg: KVConfig) -> None:
            super().__init__()
            self.cfg = cfg
            self.k_blocks: list[_Packed] = []
            self.v_blocks: list[_Packed] = []
            self.quantized_tokens = 0

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
            old_k = [dequantize_keys(p, key_states.dtype) for p in self.k_blocks]
            old_v = [dequantize_values(p, value_states.dtype) for p in self.v_blocks]
            keys = torch.cat([*old_k, self.keys], dim=-2)
            values = torch.cat([*old_v, self.values], dim=-2)
            self._flush()
            return keys, values

        def _flush(self) -> None:
            """Quantize the oldest ``group`` float tokens while the window would stay ≥ ``residual``."""
            g, bits = self.cfg.group, self.cfg.bits
            while self.keys.shape[-2] - g >= self.cfg.residual:
                self.k_blocks.append(quantize_keys(self.keys[..., :g, :], bits))
                self.v_blocks.append(quantize_values(self.values[..., :g, :], bits, g))
                self.keys, self.values = self.keys[..., g:, :], self.values[..., g:, :]
                self.quantized_tokens += g

        def get_seq_length(self) -> int:
            if not self.is_initialized:
                return 0
            return self.quantized_tokens + self.keys.shape[-2]

        def nbytes(self) -> int:
            floats = 0
            if self.is_initialized:
                floats = sum(t.numel() * t.element_size() for t in (self.keys, self.values))
            return floats + sum(p.nbytes() for p in (*self.k_blocks, *self.v_blocks))

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            """Keep the batch rows ``indices`` (generation drops finished rows): codes select exactly."""
            super().batch_select_indices(indices)
            self.k_blocks = [p.select(indices) for p in self.k_blocks]
            self.v_blocks = [p.select(indices) for p in self.v_blocks]

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            raise ConfigError("the KIVI cache does not support beam search")

    _LAYER.append(KIVILayer)
    return KIVILayer
