"""One-way package dependencies: every import in q2lab obeys the layer table of docs/DESIGN.md
("Import rules"), which this test parses (the table is the rule; nothing is restated here).

Each module is read with :mod:`ast`: top-level and function-level (lazy) imports, absolute and
relative, ``TYPE_CHECKING`` blocks included.  ``from pkg import name`` counts as importing
``pkg.name`` when that is a module, else ``pkg``.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "q2lab"
DESIGN = ROOT / "docs" / "DESIGN.md"
SECTION = "## Import rules"
_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*`([A-Za-z0-9_.]+)`\s*\|")


def parse_rules(text: str) -> dict[str, int]:
    """``{package: layer}`` from the table of the "Import rules" section (package names are
    relative to q2lab, the root ``__init__`` is ``q2lab``)."""
    start = text.index(SECTION)
    nxt = text.find("\n## ", start + len(SECTION))
    rules: dict[str, int] = {}
    for line in text[start : nxt if nxt >= 0 else None].splitlines():
        m = _ROW.match(line.strip())
        if m:
            rules[m.group(2)] = int(m.group(1))
    return rules


def unit_of(module: str, rules: dict[str, int]) -> str | None:
    """The table row a dotted module name belongs to (longest matching package), or None."""
    if module == PACKAGE:
        return PACKAGE if PACKAGE in rules else None
    rel = module.removeprefix(PACKAGE + ".")
    matches = [u for u in rules if u != PACKAGE and (rel == u or rel.startswith(u + "."))]
    return max(matches, key=len, default=None)


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    module: str
    imported: str
    rule: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.module} imports {self.imported}: {self.rule}"


def _modules(root: Path) -> dict[str, Path]:
    """Dotted name → file of every module of the package under ``root``."""
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported module) of every import statement anywhere in ``tree``."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.append((node.lineno, sub if sub in known else target))
    ours = [(ln, t) for ln, t in found if t == PACKAGE or t.startswith(PACKAGE + ".")]
    return list(dict.fromkeys(ours))  # ``from m import a, b``: m once


def check(root: Path, rules: dict[str, int]) -> list[Violation]:
    """Every import of a q2lab module under ``root`` that breaks ``rules``."""
    modules = _modules(root)
    known = set(modules)
    out: list[Violation] = []
    for module, path in modules.items():
        rel = path.relative_to(root).as_posix()
        unit = unit_of(module, rules)
        if unit is None:
            out.append(Violation(rel, 1, module, "-", f"no row for {module} in docs/DESIGN.md {SECTION!r}"))
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, imported in _imports(tree, module, path.name == "__init__.py", known):
            target = unit_of(imported, rules)
            if target == unit:
                continue
            if target is None:
                rule = f"no row for {imported} in docs/DESIGN.md {SECTION!r}"
            elif rules[target] >= rules[unit]:
                rule = (
                    f"{unit} (layer {rules[unit]}) may not import {target} (layer {rules[target]}); "
                    "only its own package and lower layers"
                )
            else:
                continue
            out.append(Violation(rel, line, module, imported, rule))
    return out


def _rules() -> dict[str, int]:
    return parse_rules(DESIGN.read_text(encoding="utf-8"))


def test_rules_table_covers_every_package():
    rules = _rules()
    # the layering the design states, so a table that lost its rows cannot pass vacuously
    assert rules["transforms"] < rules["quant"] and rules["codebooks"] < rules["quant"]
    assert rules["models.arch"] < rules["calib"] < rules["quant"] < rules["models"]
    assert rules["quant"] < rules["finetune"] < rules["export"] < rules["eval"] < rules["study"]
    assert rules["study"] < rules["api"] < rules["cli"]
    top = {p.name for p in (ROOT / PACKAGE).iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    top |= {p.stem for p in (ROOT / PACKAGE).glob("*.py") if p.name != "__init__.py"}
    assert not top - set(rules), f"packages without a row in docs/DESIGN.md {SECTION!r}: {top - set(rules)}"


def test_every_import_follows_the_layers():
    violations = check(ROOT, _rules())
    assert not violations, (
        f"{len(violations)} import(s) break the one-way layers of docs/DESIGN.md {SECTION!r}:\n"
        + "\n".join(f"  {v}" for v in violations)
    )


def test_checker_catches_planted_violations(tmp_path):
    """The checker fails where it should: upward, same-layer, lazy and relative imports, and a
    module without a row; allowed imports (own package, lower layers) pass."""
    rules = {"q2lab": 0, "errors": 0, "utils": 1, "transforms": 2, "codebooks": 2, "models.arch": 3}
    rules |= {"quant": 5, "models": 6, "finetune": 7, "export": 8}
    files = {
        "__init__.py": "",
        "errors.py": "",
        "utils/__init__.py": "",
        "utils/packing.py": "from q2lab.errors import ConfigError\n",
        "transforms/__init__.py": "",
        "transforms/hadamard.py": (
            "from q2lab.utils.packing import pack_bits\n"  # lower layer: fine
            "from q2lab.quant.packing import unpack_bits\n"  # 2: upward
            "from q2lab import codebooks\n"  # 3: same layer
        ),
        "codebooks/__init__.py": "",
        "quant/__init__.py": "",
        "quant/packing.py": "",
        "quant/base.py": "from . import packing\nfrom .packing import x\n",  # own package: fine
        "quant/rht_linear.py": (
            "import torch\n"
            "from q2lab.models.arch import find_decoder\n"  # models.arch is below quant: fine
            "def f():\n"
            "    from ..finetune.relax import stored_rht\n"  # 4: lazy, relative, upward
            "    return stored_rht\n"
        ),
        "models/__init__.py": "",
        "models/arch.py": "import q2lab.models.loader\n",  # 1: arch (3) may not import models (6)
        "models/loader.py": "from q2lab.export.checkpoint import load_checkpoint\n",  # 1: writer
        "finetune/__init__.py": "",
        "finetune/relax.py": "from q2lab.quant.rht_linear import stored_rht\n",
        "export/__init__.py": "",
        "export/checkpoint.py": "from q2lab.models.loader import LoadedModel\n",
        "newpkg/__init__.py": "",  # 1: no row
    }
    for name, text in files.items():
        path = tmp_path / "q2lab" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    found = {(v.module, v.line, v.imported) for v in check(tmp_path, rules)}
    assert found == {
        ("q2lab.transforms.hadamard", 2, "q2lab.quant.packing"),
        ("q2lab.transforms.hadamard", 3, "q2lab.codebooks"),
        ("q2lab.quant.rht_linear", 4, "q2lab.finetune.relax"),
        ("q2lab.models.arch", 1, "q2lab.models.loader"),
        ("q2lab.models.loader", 1, "q2lab.export.checkpoint"),
        ("q2lab.newpkg", 1, "-"),
    }
    msg = "\n".join(str(v) for v in check(tmp_path, rules))
    assert "q2lab/quant/rht_linear.py:4: q2lab.quant.rht_linear imports q2lab.finetune.relax" in msg
    assert "quant (layer 5) may not import finetune (layer 7)" in msg


def test_parse_rules_reads_only_the_section_table():
    text = (
        "## Other\n| 9 | `quant` | not a rule |\n"
        f"{SECTION}\n| layer | package | x |\n|--:|--|--|\n| 0 | `errors` | e |\n| 5 | `quant` | q |\n"
        "## Next\n| 1 | `eval` | not a rule |\n"
    )
    assert parse_rules(text) == {"errors": 0, "quant": 5}
