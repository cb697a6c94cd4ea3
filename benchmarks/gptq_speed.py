"""How long does q2lab's GPTQ take on Llama-7B-shaped layers, and how does it compare to a peer?

Measures wall-clock seconds and peak memory to GPTQ-quantize one linear layer (act-order,
group size 128, asymmetric min/max grid) at each bit-width, for the 7B shapes q_proj-like
4096×4096, up/gate 11008×4096 and down 4096×11008 (out × in).  Each case runs in its own
subprocess so its peak memory is its own.  Peers, run in the same invocation:

* ``q2lab-unbatched``: q2lab's GPTQ with ``block_size=1``, the textbook per-column update
  (every column's error is pushed to all remaining columns at once).  Same algorithm, same
  rounding, so the proxy loss ``tr((W−Q) H (W−Q)ᵀ)/n`` must match: the batched speed-up is
  not bought with quality.  On CPU it is too slow for full 7B layers, so by default it runs
  on a subset of output rows and its full-layer time is *estimated* (marked ``*``): GPTQ
  treats each output row independently with the same H⁻¹, so its cost is the row-independent
  part (Hessian preparation and inverse Cholesky, timed separately) plus a sweep whose cost is
  exactly proportional to the number of rows.
* ``llmcompressor``: vLLM's llm-compressor GPTQ kernel (``quantize_weight``), when importable.
  Its package ``__init__`` pulls its whole pipeline (pinned transformers, datasets,
  auto-round), while the kernel needs only ``compressed-tensors``; install both with
  ``--no-deps`` into a separate folder (see benchmarks/README.md) and pass ``--peer-path``.
  It fits group scales on the original weights ("static groups") while q2lab fits them on the
  error-updated weights, so its proxy loss differs a little; it returns fake-quantized floats
  (no packing), q2lab's time includes packing.

The Hessian is synthetic but shaped like a real one: E[xxᵀ] of activations with low-rank
correlation, isotropic noise, log-normal channel scales and ~0.5% outlier channels (×25), built
in closed form (no token matrix), so building it costs one (r×n)ᵀ(r×n) product.

Run ``python benchmarks/gptq_speed.py --quick`` for a smoke run, or with no flags for the full
set on CUDA when available.  ``--json OUT`` writes every number with the machine description.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from q2lab.utils.io import write_json_atomic

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout, installed or not
    sys.path.insert(0, str(REPO))
FULL_SHAPES = "4096x4096,11008x4096,4096x11008"
QUICK_SHAPES = "512x512,1408x512,512x1408"  # about the same aspect ratios, 8× smaller
IMPLS = ("q2lab", "q2lab-unbatched", "llmcompressor")
PEERS = IMPLS[1:]
RESULT_TAG = "@@gptq_speed "
CALIB_TOKENS = 128 * 2048  # the usual 128 windows of 2048 tokens; only scales XᵀX
CPU_PEER_ELEMENT_BUDGET = 4e9  # unbatched sweep element-updates allowed per CPU case (~5-20 s)


# --------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One measurement: an implementation on one shape and bit-width."""

    impl: str
    rows: int
    cols: int
    bits: int
    group_size: int
    device: str
    threads: int | None
    seed: int
    run_rows: int  # rows actually quantized (< rows: a subset, time extrapolated)
    check_rows: int  # leading rows on which the proxy loss is compared across impls
    repeat: int = 1
    peer_path: str | None = None

    @property
    def label(self) -> str:
        return f"{self.rows}x{self.cols} b{self.bits}"


@dataclass
class Result:
    case: Case
    seconds: float | None = None  # best of ``repeat`` runs, on run_rows rows
    fixed_seconds: float | None = None  # row-independent part (H prep + inverse Cholesky)
    est_seconds: float | None = None  # estimate for all rows when run_rows < rows
    peak_extra_mib: float | None = None  # peak memory during quantization above the start
    peak_rss_mib: float | None = None  # process high-water mark (CPU) incl. the problem itself
    proxy_loss: float | None = None  # tr(D H Dᵀ)/n per row over check_rows rows, D = W − Q
    rtn_loss: float | None = None  # the same for round-to-nearest, for scale
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def full_seconds(self) -> float | None:
        """Time for the whole layer: measured, or estimated from a row subset."""
        return self.est_seconds if self.est_seconds is not None else self.seconds


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"4096x4096,11008x4096"`` → [(4096, 4096), (11008, 4096)] (out × in)."""
    shapes = []
    for part in text.split(","):
        try:
            rows, cols = (int(x) for x in part.lower().split("x"))
        except ValueError:
            raise SystemExit(f"bad shape {part!r}: expected OUTxIN, e.g. 11008x4096") from None
        shapes.append((rows, cols))
    return shapes


def peer_rows(rows: int, cols: int, device: str, setting: str) -> int:
    """Rows the unbatched peer runs on: all on CUDA; on CPU enough for a ~5-20 s sweep."""
    if setting == "all" or (setting == "auto" and device == "cuda"):
        return rows
    if setting != "auto":
        return max(1, min(rows, int(setting)))
    fit = int(CPU_PEER_ELEMENT_BUDGET / (cols * cols / 2))
    return min(rows, max(64, fit // 32 * 32))


# --------------------------------------------------------------------------- worker side
def synthetic_problem(rows: int, cols: int, seed: int, device: str) -> tuple[Any, Any]:
    """A weight and a realistic Hessian, deterministic in ``seed``, built without token matrices.

    H = E[xxᵀ] for x = s ⊙ (Mᵀz/√r + 0.2ε): rank-r correlation with a decaying spectrum,
    isotropic noise so H is full rank, log-normal channel scales s and a few outlier channels.
    """
    import torch

    from q2lab.calib.hessian import Hessian

    g = torch.Generator().manual_seed(seed)
    rank = min(256, cols)
    spectrum = (1.0 + torch.arange(rank, dtype=torch.float32)).rsqrt()
    m = torch.randn(rank, cols, generator=g) * spectrum[:, None]
    h = (m.T @ m) / rank
    h.diagonal().add_(0.04)
    scale = torch.exp(0.5 * torch.randn(cols, generator=g))
    outliers = torch.randperm(cols, generator=g)[: max(1, cols // 200)]
    scale[outliers] *= 25.0
    h.mul_(scale[:, None]).mul_(scale[None, :])
    xtx = (h.to(torch.float64) * CALIB_TOKENS).to(device)
    del h, m
    row_scale = torch.exp(0.25 * torch.randn(rows, 1, generator=g))
    w = (torch.randn(rows, cols, generator=g) * 0.02 * row_scale).to(device)
    return w, Hessian(xtx, CALIB_TOKENS)


def _q2lab_runner(block_size: int) -> Callable:
    def run(w: Any, hessian: Any, case: Case) -> Any:
        from q2lab.quant import get_quantizer
        from q2lab.quant.gptq import GPTQConfig

        cfg = GPTQConfig(bits=case.bits, group_size=case.group_size, act_order=True, block_size=block_size)
        qt = get_quantizer("gptq").quantize(w, hessian, cfg)
        return lambda: qt.dequantize()

    return run


def import_llmcompressor_gptq(peer_path: str | None) -> types.ModuleType:
    """llm-compressor's GPTQ kernel module without running its heavy package ``__init__``.

    The parent packages are registered as bare namespace modules pointing at the installed
    folders, so only ``gptq_quantize``/``helpers`` and their compressed-tensors imports load.
    """
    if peer_path and peer_path not in sys.path:
        sys.path.insert(0, peer_path)
    spec = importlib.util.find_spec("compressed_tensors")
    root = next((Path(p) / "llmcompressor" for p in sys.path if (Path(p) / "llmcompressor").is_dir()), None)
    if spec is None or root is None:
        raise ImportError("llmcompressor and compressed-tensors not found (see --peer-path)")
    for name, sub in (("llmcompressor", ""), ("llmcompressor.modifiers", "modifiers")):
        module = types.ModuleType(name)
        module.__path__ = [str(root / sub)]
        sys.modules.setdefault(name, module)
    gptq_pkg = types.ModuleType("llmcompressor.modifiers.gptq")
    gptq_pkg.__path__ = [str(root / "modifiers" / "gptq")]
    sys.modules.setdefault("llmcompressor.modifiers.gptq", gptq_pkg)
    return importlib.import_module("llmcompressor.modifiers.gptq.gptq_quantize")


def run_llmcompressor(w: Any, hessian: Any, case: Case) -> Any:
    """llm-compressor's ``quantize_weight``: static act-order groups, min/max asymmetric qparams."""
    import torch

    gq = import_llmcompressor_gptq(case.peer_path)  # first: it puts --peer-path on sys.path
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import calculate_qparams

    from q2lab.quant.uniform import GroupLayout

    args = QuantizationArgs(
        num_bits=case.bits,
        type="int",
        symmetric=False,
        strategy="group",
        group_size=case.group_size,
        actorder="static",
    )
    h = hessian.mean(torch.float32)
    perm = torch.argsort(torch.diagonal(h), descending=True)
    # "static" act-order: groups are consecutive act-ordered columns, qparams fixed up front
    w_perm = w[:, perm]
    bounds = GroupLayout.make(w.shape[1], case.group_size).bounds()
    mins = torch.stack([w_perm[:, s:e].amin(1) for s, e in bounds], dim=1)
    maxs = torch.stack([w_perm[:, s:e].amax(1) for s, e in bounds], dim=1)
    scale, zero = calculate_qparams(mins, maxs, args)
    q, _, _ = gq.quantize_weight(w[None].clone(), h[None], scale[None], zero[None], None, args, 128, 0.01)
    return lambda: q[0]


RUNNERS: dict[str, Callable] = {
    "q2lab": _q2lab_runner(128),
    "q2lab-unbatched": _q2lab_runner(1),
    "llmcompressor": run_llmcompressor,
}


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


@contextlib.contextmanager
def peak_memory(device: str) -> Iterator[dict[str, float]]:
    """Peak memory above the level at entry: CUDA allocator stats, or sampled process RSS."""
    out: dict[str, float] = {}
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield out
        out["extra"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        return
    try:
        import psutil
    except ImportError:  # ru_maxrss in the result still bounds it
        yield out
        return
    proc, stop, peak = psutil.Process(), threading.Event(), [0]
    base = proc.memory_info().rss

    def sample() -> None:
        while not stop.wait(0.002):
            peak[0] = max(peak[0], proc.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], proc.memory_info().rss)
        out["extra"] = (peak[0] - base) / 2**20


def proxy_loss(w: Any, q: Any, hessian: Any, rows: int) -> float:
    """tr(D H Dᵀ)/n per row over the first ``rows`` rows: the layer-output error GPTQ minimises."""
    import torch

    d = (w[:rows] - q[:rows].to(w.device)).float()
    h = hessian.mean(torch.float32)
    return float(((d @ h) * d).sum()) / rows


def rtn_loss(w: Any, hessian: Any, case: Case) -> float:
    from q2lab.quant import get_quantizer, make_config

    cfg = make_config("rtn", {"bits": case.bits, "group_size": case.group_size})
    qt = get_quantizer("rtn").quantize(w[: case.check_rows], None, cfg)
    return proxy_loss(w, qt.dequantize(), hessian, case.check_rows)


def fixed_cost_seconds(hessian: Any, w: Any, device: str) -> float:
    """Row-independent part of q2lab's GPTQ: Hessian prep, act-order permutation, inverse Cholesky."""
    import torch

    from q2lab.quant.gptq import inverse_cholesky_upper, prepare_hessian

    sync(device)
    t0 = time.perf_counter()
    h, _ = prepare_hessian(hessian, w[:1])
    perm = torch.argsort(torch.diagonal(h), descending=True)
    inverse_cholesky_upper(h[perm][:, perm], 0.01)
    sync(device)
    return time.perf_counter() - t0


def warm_up(case: Case) -> None:
    """One tiny run so CUDA context, cuBLAS/cuSOLVER handles and Triton JIT are not timed."""
    w, hessian = synthetic_problem(64, 2 * case.group_size, case.seed + 1, case.device)
    RUNNERS[case.impl](w, hessian, case)()
    sync(case.device)


def measure(case: Case) -> Result:
    """Time and measure one case (in this process: the parent gives each case its own)."""
    import resource

    import torch

    if case.threads:
        torch.set_num_threads(case.threads)
    result = Result(case)
    warm_up(case)
    w, hessian = synthetic_problem(case.rows, case.cols, case.seed, case.device)
    w_run = w[: case.run_rows].contiguous()
    times = []
    for _ in range(case.repeat):
        with peak_memory(case.device) as mem:
            sync(case.device)
            t0 = time.perf_counter()
            dequant = RUNNERS[case.impl](w_run, hessian, case)
            sync(case.device)
            times.append(time.perf_counter() - t0)
    result.seconds = min(times)
    result.peak_extra_mib = mem.get("extra")
    result.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result.proxy_loss = proxy_loss(w, dequant(), hessian, case.check_rows)
    if case.impl == "q2lab":
        result.rtn_loss = rtn_loss(w, hessian, case)
    if case.run_rows < case.rows:
        result.fixed_seconds = fixed_cost_seconds(hessian, w, case.device)
        sweep = max(0.0, result.seconds - result.fixed_seconds)
        result.est_seconds = result.fixed_seconds + sweep * case.rows / case.run_rows
        result.notes.append(
            f"ran {case.run_rows}/{case.rows} rows in {result.seconds:.2f} s; full time estimated as "
            f"fixed {result.fixed_seconds:.2f} s + sweep × {case.rows / case.run_rows:.1f} "
            "(memory: the subset's)"
        )
    if case.device == "cuda" and case.repeat == 1:
        result.notes.append("single timed run after a warm-up")
    return result


def worker_main(spec: str) -> None:
    case = Case(**json.loads(spec))
    try:
        result = measure(case)
    except Exception as e:  # reported per case; the other cases still run
        result = Result(case, error=f"{type(e).__name__}: {e}")
    print(RESULT_TAG + json.dumps(asdict(result)), flush=True)


# --------------------------------------------------------------------------- parent side
def run_case(case: Case, timeout_s: float) -> Result:
    """Run ``case`` in a fresh interpreter so its memory high-water mark is its own."""
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=pythonpath)
    if case.threads:
        env.update(OMP_NUM_THREADS=str(case.threads), MKL_NUM_THREADS=str(case.threads))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(asdict(case))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return Result(case, error=f"timed out after {timeout_s:.0f} s")
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith(RESULT_TAG)), None)
    if line is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return Result(case, error=f"worker exited {proc.returncode}: {' | '.join(tail)}")
    data = json.loads(line[len(RESULT_TAG) :])
    data["case"] = Case(**data["case"])
    return Result(**data)


def peer_available(name: str, peer_path: str | None) -> str | None:
    """None when ``name`` can run here, else why not."""
    if name != "llmcompressor":
        return None
    paths = [peer_path] if peer_path else []
    have_ct = any((Path(p) / "compressed_tensors").is_dir() for p in paths) or bool(
        importlib.util.find_spec("compressed_tensors")
    )
    kernel = Path("llmcompressor", "modifiers", "gptq", "gptq_quantize.py")
    if have_ct and any(p and (Path(p) / kernel).is_file() for p in [*paths, *sys.path]):
        return None
    return "not installed (see benchmarks/README.md for a --no-deps install and --peer-path)"


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return requested


def machine_info(device: str, threads: int | None) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": threads or torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def fmt(x: float | None, spec: str = ".2f", missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


def print_table(results: list[Result]) -> None:
    header = f"{'shape (out×in)':>15} {'bits':>4} {'impl':>16} {'rows run':>11} {'seconds':>9} "
    header += f"{'peak +MiB':>10} {'maxRSS MiB':>10} {'proxy loss/row':>15} {'rtn loss/row':>13}"
    print(header)
    print("-" * len(header))
    for r in results:
        c = r.case
        shape = f"{c.rows}x{c.cols}"
        if r.error:
            print(f"{shape:>15} {c.bits:>4} {c.impl:>16}  FAILED: {r.error}")
            continue
        secs = fmt(r.full_seconds) + ("*" if r.est_seconds is not None else " ")
        print(
            f"{shape:>15} {c.bits:>4} {c.impl:>16} {f'{c.run_rows}/{c.rows}':>11} {secs:>9} "
            f"{fmt(r.peak_extra_mib, '.0f'):>10} {fmt(r.peak_rss_mib, '.0f'):>10} "
            f"{fmt(r.proxy_loss, '.6e'):>15} {fmt(r.rtn_loss, '.4e'):>13}"
        )
    notes = sorted({f"{r.case.impl} {r.case.label}: {n}" for r in results for n in r.notes})
    if any(r.est_seconds is not None for r in results):
        print("* estimated for all rows from a row subset (rows are independent in GPTQ; see notes)")
    for n in notes:
        print(f"  note: {n}")


def ratios(results: list[Result]) -> list[dict[str, Any]]:
    """Per shape/bits/peer: how much faster q2lab is and how its proxy loss compares."""
    base = {r.case.label: r for r in results if r.case.impl == "q2lab" and not r.error}
    out = []
    for r in results:
        ours = base.get(r.case.label)
        if r.case.impl == "q2lab" or r.error or ours is None or not ours.full_seconds:
            continue
        loss_ratio = ours.proxy_loss / r.proxy_loss if ours.proxy_loss and r.proxy_loss else None
        out.append(
            {
                "shape": f"{r.case.rows}x{r.case.cols}",
                "bits": r.case.bits,
                "peer": r.case.impl,
                "speedup": (r.full_seconds or 0) / ours.full_seconds,
                "speedup_estimated": r.est_seconds is not None,
                "loss_ratio": loss_ratio,
                "loss_rows": r.case.check_rows,
            }
        )
    return out


RATIO_WIDTHS = (11, 4, 16, 17, 16, 6)


def print_ratios(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    print("\nq2lab (batched) against each peer, same run:")
    head = ("shape", "bits", "peer", "peer s / q2lab s", "loss q2lab/peer", "rows")
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, RATIO_WIDTHS)))
    for r in rows:
        speed = f"{r['speedup']:.1f}x" + ("*" if r["speedup_estimated"] else "")
        loss = fmt(r["loss_ratio"], ".6f")
        cells = (r["shape"], r["bits"], r["peer"], speed, loss, r["loss_rows"])
        print(" ".join(f"{c:>{w}}" for c, w in zip(cells, RATIO_WIDTHS)))


def build_cases(args: argparse.Namespace, device: str) -> list[Case]:
    shapes = parse_shapes(args.shapes or (QUICK_SHAPES if args.quick else FULL_SHAPES))
    bits = [int(b) for b in args.bits.split(",")]
    impls = ["q2lab", *args.peers]
    cases = []
    for rows, cols in shapes:
        subset = peer_rows(rows, cols, device, args.peer_rows)
        for b in bits:
            for impl in impls:
                run_rows = subset if impl == "q2lab-unbatched" else rows
                cases.append(
                    Case(
                        impl, rows, cols, b, args.group_size, device, args.threads, args.seed,
                        run_rows, check_rows=subset, repeat=args.repeat, peer_path=args.peer_path,
                    )
                )  # fmt: skip
    return cases


def _rows_setting(text: str) -> str:
    if text in ("auto", "all") or (text.isdigit() and int(text) > 0):
        return text
    raise argparse.ArgumentTypeError(f"expected auto, all or a positive number, got {text!r}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", help=f"comma-separated OUTxIN (default {FULL_SHAPES}; --quick {QUICK_SHAPES})")
    p.add_argument("--bits", default="4,2", help="comma-separated bit-widths (default 4,2)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, help="torch/OMP threads per case (default: torch's default)")
    p.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    p.add_argument("--json", type=Path, help="write all results and the machine description here")
    p.add_argument(
        "--peers",
        default="auto",
        help=f"comma-separated from {', '.join(PEERS)}, 'none', or 'auto' (= every one installed)",
    )
    p.add_argument("--peer-path", help="folder holding llmcompressor + compressed_tensors (pip --target)")
    p.add_argument(
        "--peer-rows", default="auto", type=_rows_setting, help="rows for q2lab-unbatched: auto, all or N"
    )
    p.add_argument("--repeat", type=int, help="timed runs per case, fastest kept (default 1; --quick 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--case-timeout", type=float, default=1800, help="seconds before a case is abandoned")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def select_peers(args: argparse.Namespace) -> list[str]:
    if args.peers == "none":
        return []
    wanted = list(PEERS) if args.peers == "auto" else [p.strip() for p in args.peers.split(",")]
    unknown = sorted(set(wanted) - set(PEERS))
    if unknown:
        raise SystemExit(f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    chosen = []
    for peer in wanted:
        why = peer_available(peer, args.peer_path)
        if why is None:
            chosen.append(peer)
        elif args.peers != "auto":
            raise SystemExit(f"peer {peer}: {why}")
        else:
            print(f"peer {peer} skipped: {why}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.repeat is None:
        args.repeat = 3 if args.quick else 1
    if args.worker:
        worker_main(args.worker)
        return 0
    device = resolve_device(args.device)
    args.peers = select_peers(args)
    info = machine_info(device, args.threads)
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    results = []
    for case in build_cases(args, device):
        result = run_case(case, args.case_timeout)
        status = result.error or f"{fmt(result.seconds)} s on {case.run_rows} rows"
        print(f"  {case.impl:>16} {case.rows}x{case.cols} b{case.bits}: {status}", flush=True)
        results.append(result)
    print()
    print_table(results)
    summary = ratios(results)
    print_ratios(summary)
    if args.json:
        records = [asdict(r) for r in results]
        payload = {"machine": info, "args": vars(args), "results": records, "ratios": summary}
        write_json_atomic(args.json, payload)
        print(f"\nwrote {args.json}")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
