"""The shared Hessian store: computed once per (model, corpus or corpus mix, windows, ctx, seed), on disk.

Layout of a store folder ``<root>/<model>-<key16>/``::

    manifest.json          key fields, versions, timings, linear → (block, tensor) map
    block_0000.safetensors float64 XᵀX per shared-input group of block 0, and so on

The folder is built under a temporary name and renamed when complete, so a store that exists
is always whole; every later ``calibrate`` call with the same key reuses it without touching
the model.  Reading is per block, so quantization holds one block's Hessians at a time.
"""

from __future__ import annotations

import functools
import json
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from q2lab.calib import capture
from q2lab.calib.capture import stream_hessians
from q2lab.calib.hessian import Hessian
from q2lab.data.language import join_languages
from q2lab.data.text import (
    Corpus,
    CorpusMix,
    corpus_language,
    load_corpus,
    mix_counts,
    mix_windows,
    parse_mix,
)
from q2lab.errors import CorruptFileError, ModelError, Q2labError
from q2lab.models.arch import EXPERT_LINEARS, find_decoder
from q2lab.utils.io import atomic_path, cache_dir, sha256_json, write_json_atomic
from q2lab.utils.provenance import versions
from q2lab.utils.tensorfile import SafetensorsFiles, write_safetensors

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class CalibSpec:
    """What a store is computed from (the rest of the key is the model and corpus content).

    ``corpus`` is a name, a path or a ``+``-joined mix (``wikitext2+polish``); ``weights`` are
    the mix's shares (None: equal).  Checked on construction, so a bad mix fails before any
    model is loaded."""

    corpus: str = "wikitext2"
    windows: int = 128
    ctx: int = 512
    seed: int = 0
    weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        mix = parse_mix(self.corpus, self.weights)
        object.__setattr__(self, "corpus", mix.name)
        object.__setattr__(self, "weights", None if mix.is_single or self.weights is None else mix.weights)

    @functools.cached_property
    def mix(self) -> CorpusMix:
        return parse_mix(self.corpus, self.weights)

    def to_dict(self) -> dict[str, Any]:
        mix = self.mix
        weights = {} if mix.is_single else {"weights": list(mix.weights)}
        return {"corpus": self.corpus, "windows": self.windows, "ctx": self.ctx, "seed": self.seed, **weights}


def store_key(model_fingerprint: str, corpus_sha256: str, spec: CalibSpec, add_bos: bool) -> str:
    return sha256_json(
        {
            "format": FORMAT_VERSION,
            "model": model_fingerprint,
            "corpus_sha256": corpus_sha256,
            "windows": spec.windows,
            "ctx": spec.ctx,
            "seed": spec.seed,
            "add_bos": add_bos,
        }
    )


class HessianStore:
    """Read access to a complete store folder, one block file at a time."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.exists():
            raise CorruptFileError(f"{self.path} is not a q2lab Hessian store (no {MANIFEST})")
        try:
            self.manifest: dict[str, Any] = json.loads(manifest.read_text())
        except json.JSONDecodeError as e:
            raise CorruptFileError(f"{manifest} is not valid JSON: {e}") from e
        if self.manifest.get("format") != FORMAT_VERSION:
            raise CorruptFileError(
                f"{self.path}: Hessian store format {self.manifest.get('format')} is not supported"
            )
        self._cache: tuple[int, str, torch.Tensor] | None = None
        self._description: dict[str, Any] | None = None

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def linears(self) -> dict[str, dict[str, Any]]:
        return self.manifest["linears"]

    def block_file(self, block: int) -> Path:
        return self.path / f"block_{block:04d}.safetensors"

    def _tensor(self, block: int, name: str) -> torch.Tensor:
        """One Hessian of a block file, read alone (a 7B block's file is 2 GiB, its largest
        Hessian 1.6); the last one read is kept, since the linears of a group ask in turn."""
        if self._cache is None or self._cache[:2] != (block, name):
            self._cache = None  # drop the previous one before reading the next
            path = self.block_file(block)
            try:
                files = SafetensorsFiles(path)
            except (ModelError, CorruptFileError) as e:
                raise CorruptFileError(f"cannot read Hessians from {path}: {e}") from e
            if name not in files:
                raise CorruptFileError(f"Hessian store {self.path}: {path.name} has no tensor {name}")
            self._cache = (block, name, files.read(name))
        return self._cache[2]

    def hessian(self, linear: str) -> Hessian:
        """The Hessian of the input of ``linear`` (full module name, e.g. ``model.layers.3.mlp.up_proj``)."""
        entry = self.linears.get(linear)
        if entry is None:
            raise ModelError(
                f"the Hessian store {self.path} has no entry for layer {linear}; was it built for this model?"
            )
        return Hessian(self._tensor(entry["block"], entry["tensor"]), int(entry["n"]))

    def importance(self, linear: str) -> torch.Tensor:
        return self.hessian(linear).importance()

    def describe(self) -> dict[str, Any]:
        """The manifest's key fields (a copy; computed once per store object: the row of every
        record of a study carries it)."""
        if self._description is None:
            self._description = self._describe()
        return dict(self._description)

    def _describe(self) -> dict[str, Any]:
        keep = (
            "key",
            "model",
            "model_fingerprint",
            "corpus",
            "corpus_sha256",
            "windows",
            "ctx",
            "seed",
            "weights",
            "parts",
            "language",
            "add_bos",
            "tokens",
            "seconds",
        )
        d = {k: self.manifest.get(k) for k in keep}
        d["language"] = calibration_language(d)  # stores written before languages were recorded lack it
        return d


def calibration_language(description: dict[str, Any] | None, read_files: bool = True) -> str | None:
    """The language of a store's description (:meth:`HessianStore.describe`, a checkpoint's or
    a record's copy of it): as recorded, else from its corpus name (a local file is read only
    with ``read_files``); None when unknown or unreadable."""
    if not description:
        return None
    if description.get("language"):
        return str(description["language"])
    try:
        return corpus_language(str(description.get("corpus") or ""), read_files)
    except (Q2labError, OSError):
        return None


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name or name)[:40]


def store_path(loaded, corpus_sha256: str, spec: CalibSpec, root: Path | None = None) -> tuple[Path, str]:
    key = store_key(loaded.info.fingerprint, corpus_sha256, spec, loaded.info.add_bos)
    root = Path(root) if root else cache_dir() / "hessians"
    return root / f"{_slug(loaded.info.name)}-{key[:16]}", key


def calibration_windows(
    loaded, store: HessianStore, n: int | None = None, ctx: int | None = None
) -> torch.Tensor:
    """Token windows drawn like ``store``'s own calibration windows (its corpus or mix, random
    mode and seed): ``n`` of them (default: the store's count) of ``ctx`` tokens (default: the
    store's) — what training that must see the calibration data (fine-tuning, learned
    rotations) reads."""
    spec = store.describe()
    mix = parse_mix(spec["corpus"], spec.get("weights"))
    return mix_windows(loaded, mix, n or spec["windows"], ctx or spec["ctx"], seed=spec["seed"])


def corpus_parts(spec: CalibSpec, corpora: list[Corpus]) -> tuple[str, list[dict[str, Any]]]:
    """The content hash a store key uses (a single corpus: its file hash, as before mixes; a
    mix: the hash of every part's name, hash and weight) and the parts as the manifest lists
    them; ``corpora`` are the mix's corpora, loaded."""
    mix = spec.mix
    parts = [
        {"corpus": c.name, "sha256": c.sha256, "weight": w, "windows": k, "language": c.language}
        for c, w, k in zip(corpora, mix.weights, mix_counts(spec.windows, mix.weights))
    ]
    if mix.is_single:
        return corpora[0].sha256, parts
    return sha256_json([[p["corpus"], p["sha256"], p["weight"]] for p in parts]), parts


def calibrate(loaded, spec: CalibSpec = CalibSpec(), root: Path | None = None) -> HessianStore:
    """Return the store for ``loaded`` and ``spec``, computing it only if it does not exist yet."""
    corpora = [load_corpus(name, role="calib") for name in spec.mix.names]
    corpus_sha256, parts = corpus_parts(spec, corpora)
    path, key = store_path(loaded, corpus_sha256, spec, root)
    if (path / MANIFEST).exists():
        store = HessianStore(path)
        if store.key == key:
            return store
    windows = mix_windows(loaded, spec.mix, spec.windows, spec.ctx, seed=spec.seed, corpora=corpora)
    layout = find_decoder(loaded.model)
    linears: dict[str, dict[str, Any]] = {}
    t0 = time.time()
    with atomic_path(path, is_dir=True) as tmp:

        def on_block(b: int, hessians: dict[str, Hessian], groups: dict[str, str]) -> None:
            write_safetensors(tmp / f"block_{b:04d}.safetensors", {n: h.xtx for n, h in hessians.items()})
            for lin, leader in groups.items():
                linears[layout.full_name(b, lin)] = {"block": b, "tensor": leader, "n": hessians[leader].n}

        fallbacks = stream_hessians(loaded.model, windows, on_block, workdir=tmp)
        for lin, routed in fallbacks.items():
            linears[lin]["routed"] = routed  # too few routed tokens: the Hessian uses all of them
        starved = len(fallbacks) // len(EXPERT_LINEARS)
        if starved:
            warnings.warn(
                f"calibration: {starved} MoE experts received fewer than "
                f"{capture.MIN_EXPERT_TOKENS} routed tokens; their Hessians use every token of their "
                'block ("routed" in the store manifest lists them)',
                stacklevel=2,
            )
        write_json_atomic(
            tmp / MANIFEST,
            {
                "format": FORMAT_VERSION,
                "key": key,
                "model": loaded.info.name,
                "model_fingerprint": loaded.info.fingerprint,
                "corpus": spec.corpus,
                "corpus_sha256": corpus_sha256,
                **spec.to_dict(),
                "parts": parts,
                "language": join_languages(p["language"] for p in parts),
                "add_bos": loaded.info.add_bos,
                "tokens": int(windows.numel()),
                "seconds": round(time.time() - t0, 2),
                "versions": versions(),
                "linears": linears,
                "n_blocks": len(layout),
                "expert_fallbacks": starved,
            },
        )
    return HessianStore(path)
