"""Study YAML schema: models × methods × bits × options grid, one calibration (or several), a task list.

Example (``examples/quickstart.yaml``)::

    name: quickstart
    models: [smollm2-135m]
    calibration: {corpus: wikitext2, windows: 32, ctx: 512, seed: 0}
    methods:
      - method: fp                       # the float reference row
      - {method: rtn, bits: [2, 3, 4], group_size: 128}
      - {method: gptq, bits: [2, 3, 4], group_size: 128}
    tasks:
      - ppl:wikitext2
      - kld:wikitext2
      - {task: mc:arc_easy, limit: 100}
      - gen:collapse
    eval: {windows: 16, ctx: 512}       # defaults for ppl/kld tasks

Any list-valued option of a method entry is a grid axis (cartesian product).  Everything is
validated on load, so a typo fails before any model is loaded.

``calibration`` may also be a list of named calibrations — another grid axis, for the cells
whose method uses Hessians (``fp`` and RTN run once)::

    calibration:
      - {name: en, corpus: wikitext2, windows: 128}
      - {name: pl, corpus: polish, windows: 128}
      - {name: mix, corpus: [wikitext2, polish], weights: [0.5, 0.5], windows: 128}

Such a cell's id and label end in ``@<name>``; with one calibration ids are unchanged.
A ``corpus`` list (or ``a+b``) is a mix drawn in ``weights`` proportions (default equal).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from q2lab.calib.store import CalibSpec
from q2lab.errors import ConfigError
from q2lab.eval.tasks import TaskSpec, check_data, parse_task
from q2lab.quant.base import MethodConfig, get_quantizer, make_config
from q2lab.utils.io import sha256_json

REFERENCE_METHOD = "fp"
_TOP_KEYS = {
    "name",
    "description",
    "seed",
    "models",
    "dtype",
    "calibration",
    "methods",
    "tasks",
    "eval",
    "skip",
}


@dataclass(frozen=True)
class Cell:
    """One grid point: a model and a method with fixed options."""

    model: str
    method: str  # registry name, or "fp"
    options: dict[str, Any]
    config: MethodConfig | None  # None for the reference
    name: str | None = None  # the entry's `label`, shown instead of the generated label (not in the id)
    calib: str | None = None  # the named calibration of a study with several (None: the only one)

    @property
    def is_reference(self) -> bool:
        return self.method == REFERENCE_METHOD

    @property
    def bits(self) -> int | None:
        return None if self.config is None else int(self.config.bits)

    @property
    def id(self) -> str:
        model = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(self.model).name or self.model)
        if self.is_reference:
            return f"{model}/fp"
        opts = self.config.to_dict() if self.config else {}
        g = opts.get("group_size", "-")
        at = f"@{self.calib}" if self.calib else ""
        return f"{model}/{self.method}-b{self.bits}-g{g}-{sha256_json(opts)[:6]}{at}"

    @property
    def label(self) -> str:
        at = f" @{self.calib}" if self.calib else ""
        return self._label() + at

    def _label(self) -> str:
        if self.name:
            return self.name
        if self.is_reference:
            return "FP"
        opts = self.config.to_dict() if self.config else {}
        g = opts.get("group_size")
        extra = " ".join(
            f"{k}={v}" for k, v in sorted(self.options.items()) if k not in ("bits", "group_size")
        )
        return " ".join(x for x in (f"{self.method.upper()} {self.bits}b", f"g{g}" if g else "", extra) if x)


@dataclass
class StudyConfig:
    name: str
    models: list[str]
    cells: list[Cell]
    tasks: list[TaskSpec]
    calibration_store: str | None = None
    calibrations: dict[str | None, CalibSpec] = field(default_factory=dict)  # name → spec; {None: …} if one
    seed: int = 0
    dtype: str = "float32"
    description: str = ""
    skip: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def calibration(self) -> CalibSpec | None:
        """The first (or only) calibration."""
        return next(iter(self.calibrations.values()), None)

    @property
    def needs_hessians(self) -> bool:
        return any(not c.is_reference and get_quantizer(c.method).uses_hessian(c.config) for c in self.cells)


def load_study(path: str | Path) -> StudyConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    return parse_study(raw, source=str(path))


def parse_study(raw: Any, source: str = "study") -> StudyConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a study must be a YAML mapping")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; known: {sorted(_TOP_KEYS)}")
    models = raw.get("models")
    if isinstance(models, str):
        models = [models]
    if not models or not all(isinstance(m, str) for m in models):
        raise ConfigError(f"{source}: 'models' must be a non-empty list of model names or paths")
    methods = raw.get("methods")
    if not isinstance(methods, list) or not methods:
        raise ConfigError(f"{source}: 'methods' must be a non-empty list")
    tasks_raw = raw.get("tasks")
    if not isinstance(tasks_raw, list) or not tasks_raw:
        raise ConfigError(f"{source}: 'tasks' must be a non-empty list")
    eval_defaults = _mapping(raw.get("eval"), f"{source}: eval")
    tasks = [parse_task(t, **eval_defaults) for t in tasks_raw]
    labels = [t.label for t in tasks]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{source}: each task may appear once, got {labels}")
    for t in tasks:
        check_data(t)
    calibs, calib_store = _calibrations(raw.get("calibration"), source)
    cells = [
        cell
        for m in models
        for entry in methods
        for base in _expand(m, entry, source)
        for cell in _per_calibration(base, calibs)
    ]
    ids = [c.id for c in cells]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ConfigError(f"{source}: the grid has duplicate cells {dupes}")
    cfg = StudyConfig(
        name=str(raw.get("name") or Path(source).stem),
        models=list(models),
        cells=cells,
        tasks=tasks,
        calibration_store=calib_store,
        calibrations=calibs,
        seed=int(raw.get("seed", 0)),
        dtype=str(raw.get("dtype", "float32")),
        description=str(raw.get("description", "")),
        skip=list(raw.get("skip") or []),
        raw=raw,
    )
    if cfg.needs_hessians and cfg.calibration is None:
        raise ConfigError(
            f"{source}: methods that need Hessians are listed but there is no 'calibration' section"
        )
    return cfg


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be a mapping")
    return dict(value)


def _calibrations(value: Any, source: str) -> tuple[dict[str | None, CalibSpec], str | None]:
    """The study's calibrations by name ({None: spec} for a single mapping) and its store root."""
    if value is None:
        return {}, None
    if not isinstance(value, list):
        spec, store = _calibration(value, source, named=False)
        return {None: spec}, store
    if not value:
        raise ConfigError(f"{source}: calibration must be a mapping or a non-empty list of mappings")
    out: dict[str | None, CalibSpec] = {}
    for i, entry in enumerate(value):
        entry = _mapping(entry, f"{source}: calibration[{i}]")
        name = entry.pop("name", None)
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            raise ConfigError(
                f"{source}: calibration[{i}] needs a 'name' of letters, digits, '.', '_' or '-', got {name!r}"
            )
        if name in out:
            raise ConfigError(f"{source}: calibration name {name!r} appears twice")
        out[name] = _calibration(entry, f"{source}: calibration {name}", named=True)[0]
    return out, None


def _calibration(value: Any, source: str, named: bool) -> tuple[CalibSpec, str | None]:
    spec = _mapping(value, f"{source}: calibration")
    store = spec.pop("store", None)
    if store is not None and named:
        raise ConfigError(f"{source}: 'store' applies to a study with a single calibration mapping")
    known = {"corpus", "windows", "ctx", "seed", "weights"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ConfigError(
            f"{source}: unknown calibration key(s) {unknown}; known: {sorted(known | {'store'})}"
        )
    for key in ("windows", "ctx"):
        if key in spec and (not isinstance(spec[key], int) or spec[key] < 1):
            raise ConfigError(f"{source}: calibration {key} must be a positive integer, got {spec[key]!r}")
    if isinstance(spec.get("corpus"), list):
        spec["corpus"] = "+".join(str(c) for c in spec["corpus"])
    try:
        return CalibSpec(**spec), store
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _per_calibration(cell: Cell, calibs: dict[str | None, CalibSpec]) -> list[Cell]:
    """A Hessian-using cell once per named calibration; every other cell once."""
    names = [n for n in calibs if n is not None]
    if not names or cell.is_reference or not get_quantizer(cell.method).uses_hessian(cell.config):
        return [cell]
    return [dataclasses.replace(cell, calib=n) for n in names]


def _expand(model: str, entry: Any, source: str) -> list[Cell]:
    if isinstance(entry, str):
        entry = {"method": entry}
    if not isinstance(entry, dict) or "method" not in entry:
        raise ConfigError(f"{source}: each methods entry needs a 'method' key, got {entry!r}")
    entry = dict(entry)
    method = str(entry.pop("method")).lower()
    labels = entry.pop("label", None)
    if method == REFERENCE_METHOD:
        if entry:
            raise ConfigError(f"{source}: the fp reference takes no options, got {sorted(entry)}")
        return [Cell(model, method, {}, None, _labels(labels, 1, source)[0])]
    name = get_quantizer(method).name
    axes = {k: _axis(v, k in _list_options(name)) for k, v in entry.items()}
    combos = list(itertools.product(*axes.values()))
    names = _labels(labels, len(combos), source)
    cells = []
    for combo, label in zip(combos, names):
        options = dict(zip(axes.keys(), combo))
        cells.append(Cell(model, name, options, make_config(name, options), label))
    return cells


def _list_options(method: str) -> set[str]:
    """Options whose value is itself a list (``mixed``'s rules, ``auto``'s candidates)."""
    return {f.name for f in dataclasses.fields(get_quantizer(method).config_cls) if f.type in ("list", list)}


def _axis(value: Any, list_valued: bool) -> list[Any]:
    """An option's grid axis: a list sweeps, a scalar is one point.  For a list-valued option a
    list of lists sweeps and any other list is one value (``candidates: [{…}, {…}]``)."""
    if not isinstance(value, list):
        return [value]
    if list_valued and not (value and all(isinstance(v, list) for v in value)):
        return [value]
    return value


def _labels(value: Any, n: int, source: str) -> list[str | None]:
    """An entry's ``label``: one string for an entry of one cell, or one per cell of its grid
    (in the order the option lists expand, last option fastest)."""
    if value is None:
        return [None] * n
    values = value if isinstance(value, list) else [value]
    if len(values) != n or not all(isinstance(v, str) and v.strip() for v in values):
        want = "a non-empty string" if n == 1 else f"a list of {n} non-empty strings"
        raise ConfigError(f"{source}: 'label' must be {want} (one per cell of the entry), got {value!r}")
    return list(values)
