"""Every number in the tables of README.md and docs/ must come from a committed record.

A table's sources are named by a marker line above it,

    <!-- records: docs/results/quickstart/results.jsonl benchmarks/results/hadamard_speed.json -->

which applies to every table after it until the next heading or marker.  A table of
definitions rather than measurements (the methods' option ranges, the data sets' sizes) says so
with ``<!-- numbers: definitions -->`` and is not checked; use it for nothing measured.  A source is a results
file (``.jsonl`` / ``.json``: every numeric leaf of every record, nested details included) or a
committed benchmark output (``.txt`` / ``.md`` / ``.csv``: every number in the text).

In each table row but the header, every cell but the first (the row's label) is read for
numbers; a number ``x`` shown with ``d`` decimals is backed when some source value ``v`` rounds
to it (``|v − x| ≤ ½·10⁻ᵈ``).  ``x %`` may also be ``100·v``; ``a/b`` (``a / b``) is backed by
``a/b`` itself, or by ``a`` and ``b``; ``m × 10ᵏ`` is read as one number with m's significant
digits.  Numbers glued to letters (``4b``, ``g128``, ``Q4_K``, ``L=8`` written without spaces)
are names, not measurements.  A table with numbers and no marker, a marker naming a missing
file, and a number no source backs are all failures, reported with file and line.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!--\s*records:\s*(.*?)\s*-->")
DEFINITIONS = re.compile(r"<!--\s*numbers:\s*definitions\s*-->")
HEADING = re.compile(r"^#{1,6}\s")
_SUP = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻", "0123456789-")
SCI = re.compile(r"(\d+(?:\.\d+)?)\s*×\s*10([⁰¹²³⁴⁵⁶⁷⁸⁹⁻]+)")
FRACTION = re.compile(r"(?<![\w.])(\d+)\s*/\s*(\d+)(?![\w.])")
NUMBER = re.compile(r"(?<![\w.#])([-−+]?(?:\d+(?:\.\d+)?|\.\d+))(\s*%)?(?![\w.]|\.\d)")


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


def numbers_of(value: object) -> Iterator[float]:
    """Every finite number in a JSON value (bools excluded)."""
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        if math.isfinite(value):
            yield float(value)
    elif isinstance(value, dict):
        for v in value.values():
            yield from numbers_of(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from numbers_of(v)


def source_numbers(path: Path) -> list[float]:
    """The numbers a committed source file holds."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [x for line in text.splitlines() if line.strip() for x in numbers_of(json.loads(line))]
    if path.suffix == ".json":
        return list(numbers_of(json.loads(text)))
    return [float(m.group(1).replace("−", "-")) for m in NUMBER.finditer(text)]


class Pool:
    """Sorted source values, for ``any v within tol of x`` in log time."""

    def __init__(self, values: Iterable[float]) -> None:
        self.values = sorted(set(values))

    def has(self, x: float, tol: float) -> bool:
        import bisect

        i = bisect.bisect_left(self.values, x - tol)
        return i < len(self.values) and self.values[i] <= x + tol


DEFINITIONS_ONLY = Pool([])
UNMARKED = "table with numbers but no <!-- records: … --> marker"


def _tol(token: str) -> float:
    decimals = len(token.split(".")[1]) if "." in token else 0
    return 0.5 * 10.0**-decimals + 1e-12


def cell_problems(cell: str, pool: Pool) -> list[str]:
    """The numbers of one cell that ``pool`` does not back."""
    text = cell.replace("**", "").replace("`", "")
    bad: list[str] = []
    for m in SCI.finditer(text):
        mant, exp = m.group(1), int(m.group(2).translate(_SUP))
        x = float(mant) * 10.0**exp
        if not pool.has(x, _tol(mant) * 10.0**exp):
            bad.append(m.group(0))
    text = SCI.sub(" ", text)
    for m in FRACTION.finditer(text):
        a, b = int(m.group(1)), int(m.group(2))
        if not (b and pool.has(a / b, 1e-9)) and not (pool.has(a, 0.5) and pool.has(b, 0.5)):
            bad.append(m.group(0))
    text = FRACTION.sub(" ", text)
    for m in NUMBER.finditer(text):
        token = m.group(1).replace("−", "-").lstrip("+")
        x, tol = float(token), _tol(token)
        ok = pool.has(x, tol) or pool.has(-x, tol)  # a signed difference may be shown unsigned
        if m.group(2):
            ok = ok or pool.has(x / 100, tol / 100)
        if not ok:
            bad.append(m.group(0).strip())
    return bad


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _is_rule(line: str) -> bool:
    return bool(re.fullmatch(r"\|?[\s:|-]+\|?", line.strip())) and "-" in line


def check_file(path: Path, root: Path = ROOT) -> list[Problem]:
    """Problems of every table in the Markdown file ``path``."""
    rel = str(path.relative_to(root))
    lines = path.read_text(encoding="utf-8").splitlines()
    problems: list[Problem] = []
    pool: Pool | None = None
    in_fence = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence and HEADING.match(line):
            pool = None
        elif not in_fence and DEFINITIONS.search(line):
            pool = DEFINITIONS_ONLY
        elif not in_fence and (m := MARKER.search(line)):
            pool, missing = _pool(m.group(1), root)
            problems += [Problem(rel, i + 1, f"records file {p} does not exist") for p in missing]
        elif not in_fence and line.lstrip().startswith("|") and i + 1 < len(lines) and _is_rule(lines[i + 1]):
            i = _check_table(rel, lines, i, pool, problems)
            continue
        i += 1
    return problems


def _pool(spec: str, root: Path) -> tuple[Pool, list[str]]:
    values: list[float] = []
    missing = []
    for name in spec.replace(",", " ").split():
        p = root / name
        if p.is_file():
            values += source_numbers(p)
        else:
            missing.append(name)
    return Pool(values), missing


def _check_table(rel: str, lines: list[str], start: int, pool: Pool | None, problems: list[Problem]) -> int:
    i = start + 2
    unmarked_reported = False
    while i < len(lines) and lines[i].lstrip().startswith("|"):
        cells = _cells(lines[i])[1:]
        for cell in cells if pool is not DEFINITIONS_ONLY else []:
            if pool is None:
                if NUMBER.search(SCI.sub(" 1 ", cell.replace("**", ""))) and not unmarked_reported:
                    problems.append(
                        Problem(rel, start + 1, "table with numbers but no <!-- records: … --> marker")
                    )
                    unmarked_reported = True
                continue
            for bad in cell_problems(cell, pool):
                problems.append(Problem(rel, i + 1, f"{bad!r} in cell {cell!r} is in no named record"))
        i += 1
    return i


GENERATED = re.compile(r"^<!-- generated: (.+?) -->")


def generated_by(path: Path) -> str | None:
    """The command a generated Markdown file names on its first line (``<!-- generated: … -->``)."""
    first = path.read_text(encoding="utf-8").split("\n", 1)[0]
    m = GENERATED.match(first)
    return m.group(1) if m else None


def documents(root: Path = ROOT) -> list[Path]:
    """README.md and every hand-written Markdown file under docs/.  Generated ones — the study
    reports ``docs/results/*/report.md`` and files naming their command on the first line — are
    checked instead by regenerating them from the committed records."""
    docs = [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
    return [
        p
        for p in docs
        if not (p.name == "report.md" and p.parent.parent.name == "results") and generated_by(p) is None
    ]


def generated_documents(root: Path = ROOT) -> list[Path]:
    return [p for p in sorted((root / "docs").rglob("*.md")) if generated_by(p) is not None]


def is_study_results(path: Path) -> bool:
    """Study records (one row per cell, task and metric; they have a report.md) rather than a
    measurement file a script writes (e.g. docs/results/llamacpp-files/results.jsonl)."""
    with open(path, encoding="utf-8") as fh:
        first = fh.readline()
    return '"cell":' in first and '"study":' in first


def study_results(root: Path) -> list[Path]:
    """Every committed study's ``docs/results/*/results.jsonl`` under the repository ``root``."""
    return sorted(p for p in (root / "docs" / "results").glob("*/results.jsonl") if is_study_results(p))
