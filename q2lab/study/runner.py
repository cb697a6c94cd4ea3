"""Run a study grid: calibrate once per model, then quantize and evaluate each cell.

Results go to ``<out>/results.jsonl``, one record per cell × task × metric, appended as each
cell finishes.  A rerun skips every (cell, task) whose records are already there with the
same task settings, so an interrupted study resumes where it stopped and a finished one
only rewrites its report.  Calibration is a dependency of the cells: the Hessian store is
computed once (or found in the cache) and shared by every method.

Cells run in this process by default.  ``ray=True`` runs each cell as a Ray task (each
worker loads its own reference model; the Hessian store and reference caches are files,
so they are shared through the filesystem).
"""

from __future__ import annotations

import gc
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from q2lab.calib.store import HessianStore, calibrate, calibration_windows
from q2lab.errors import Q2labError
from q2lab.eval.distill import distill_data
from q2lab.eval.tasks import Evaluator, TaskSpec
from q2lab.finetune import finetuner
from q2lab.models.loader import LoadedModel, load_model
from q2lab.quant.model import quantize_model
from q2lab.study.config import Cell, StudyConfig, load_study
from q2lab.study.rows import ResultRow, load_results
from q2lab.utils.io import sha256_json
from q2lab.utils.provenance import machine, versions

RESULTS = "results.jsonl"


def read_results(path: Path) -> list[dict[str, Any]]:
    return load_results(path) if path.exists() else []


def done_keys(rows: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """(cell id, task key) pairs already evaluated."""
    return {(r["cell"], r.get("task_key", "")) for r in rows if "cell" in r}


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append whole lines and fsync, so a crash never leaves a partial record behind."""
    data = "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def run_study(
    study: str | Path | StudyConfig,
    out: str | Path,
    *,
    use_ray: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Run (or resume) a study; returns the results path.  Writes report.md and pareto.png."""
    cfg = study if isinstance(study, StudyConfig) else load_study(study)
    versions()  # the code state the study starts from (cached), not a later commit of a long run
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / RESULTS
    done = done_keys(read_results(results))
    for model in cfg.models:
        cells = [c for c in cfg.cells if c.model == model]
        todo = [(c, pending_tasks(c, cfg.tasks, done)) for c in cells]
        todo = [(c, ts) for c, ts in todo if ts]
        if not todo:
            log(f"{model}: all {len(cells)} cells already in {results}")
            continue
        store_paths = _calibrate_if_needed(cfg, model, todo, log)
        if use_ray:
            _run_ray(cfg, model, todo, store_paths, out, results, log)
        else:
            ctx = _CellContext(cfg, model, store_paths, out)
            for cell, tasks in todo:
                ctx.run(cell, tasks, log, sink=lambda rows: append_rows(results, rows))
            del ctx
            gc.collect()
    from q2lab.study.report import write_report

    write_report(read_results(results), out, title=f"q2lab study: {cfg.name}")
    return results


def pending_tasks(cell: Cell, tasks: list[TaskSpec], done: set) -> list[TaskSpec]:
    """The cell's tasks without rows yet; tasks that give the cell no rows never count as pending,
    so a resumed study does not redo them (the reference's KLD pass)."""
    return [t for t in tasks if t.applies_to(cell.is_reference) and (cell.id, t.key()) not in done]


def _calibrate_if_needed(cfg: StudyConfig, model: str, todo, log) -> dict[str | None, str]:
    """Store paths by calibration name, for the calibrations the pending cells use."""
    from q2lab.quant.base import get_quantizer

    names = [
        c.calib for c, _ in todo if not c.is_reference and get_quantizer(c.method).uses_hessian(c.config)
    ]
    if not names:
        return {}
    ref = load_model(model, dtype=cfg.dtype)
    paths: dict[str | None, str] = {}
    for name in dict.fromkeys(names):
        t0 = time.time()
        store = calibrate(
            ref,
            cfg.calibrations[name],
            root=Path(cfg.calibration_store) if cfg.calibration_store else None,
        )
        what = f" ({name})" if name else ""
        log(f"{model}: Hessians{what} at {store.path} ({time.time() - t0:.1f} s; reused if ≈0)")
        paths[name] = str(store.path)
    del ref
    gc.collect()
    return paths


class _CellContext:
    """What cells of one model share in one process: the reference, its caches, the store."""

    def __init__(self, cfg: StudyConfig, model: str, store_paths: dict[str | None, str], out: Path) -> None:
        self.cfg, self.model_name = cfg, model
        self.reference = load_model(model, dtype=cfg.dtype)
        self.stores = {name: HessianStore(Path(p)) for name, p in store_paths.items()}
        cache = out / "cache"
        cache.mkdir(exist_ok=True)
        self.evaluator = Evaluator(self.reference, workdir=cache)

    def run(self, cell: Cell, tasks: list[TaskSpec], log, sink=None) -> list[dict[str, Any]]:
        """The cell's result rows; with ``sink`` each task's rows also go to it as soon as the
        task finishes, so an interrupted cell keeps its finished tasks."""
        self.evaluator.warn = lambda m: log(f"warning: {m}")
        log(f"cell {cell.id}: {', '.join(t.label for t in tasks)}")
        t0 = time.time()
        if cell.is_reference:
            candidate, qinfo = self.reference, {"bpw": 16.0, "method": "fp"}
        else:
            candidate = load_model(self.model_name, dtype=self.cfg.dtype)
            assert cell.config is not None
            store = self.stores.get(cell.calib)
            teacher = distill_data(candidate, cell.config)
            tuner = finetuner(candidate, store, cell.config, teacher_data=teacher)
            report = quantize_model(
                candidate.model,
                cell.method,
                cell.config,
                store,
                skip=self.cfg.skip,
                tuner=tuner,
                windows=None
                if store is None
                else lambda n=None, ctx=None: calibration_windows(candidate, store, n, ctx),
            )
            qinfo = report.to_dict()
            if store is not None:
                candidate.info.calibration = store.describe()
        t_quant = time.time() - t0
        self.evaluator.timings.clear()
        self.evaluator.candidate_key = f"{cell.id}|{sha256_json(cell.options)}"

        def to_rows(records) -> list[dict[str, Any]]:
            return [
                self._row(cell, candidate, qinfo, t_quant, task_of(r.task, tasks), r.to_dict())
                for r in records
            ]

        on_records = None if sink is None else (lambda recs: sink(to_rows(recs)))
        rows = to_rows(self.evaluator.run(candidate, tasks, on_records=on_records))
        if candidate is not self.reference:
            del candidate
            gc.collect()
        log(f"cell {cell.id}: bpw {qinfo['bpw']:.4f}, {time.time() - t0:.1f} s")
        return rows

    def _row(
        self, cell: Cell, cand: LoadedModel, qinfo: dict, t_quant: float, task: TaskSpec, rec: dict[str, Any]
    ) -> dict[str, Any]:
        """The results.jsonl row of one record (:class:`~q2lab.study.rows.ResultRow`, as JSON)."""
        store = self.stores.get(cell.calib)
        hessians = store.describe() if store and not cell.is_reference else None
        row = ResultRow(
            study=self.cfg.name,
            cell=cell.id,
            model=cell.model,
            method=cell.method,
            bits=cell.bits,
            label=cell.label,
            options=cell.config.to_dict() if cell.config else {},
            is_reference=cell.is_reference,
            calibration=cell.calib,
            bpw=qinfo["bpw"],
            quantized_fraction=qinfo.get("quantized_fraction"),
            task_key=task.key(),
            **rec,  # the eval Record: task, metric, value, ci_low, ci_high, n, higher_is_better, details
            task_settings=_task_dict(task),
            quant={
                k: qinfo.get(k)
                for k in ("proxy_rel_mean", "notes", "quantized_params", "float_params", "formats")
            }
            | ({"bpw_no_codebooks": qinfo["bpw_no_codebooks"]} if "bpw_no_codebooks" in qinfo else {})
            | ({"finetune": qinfo["finetune"]} if qinfo.get("finetune") else {})
            | ({"plan": qinfo["plan"].get("stats")} if qinfo.get("plan") else {}),
            provenance={
                "model_fingerprint": cand.info.fingerprint,
                "model_kind": cand.info.kind,
                "add_bos": cand.info.add_bos,
                "model_notes": cand.info.notes,
                "calibration": _calibration_summary(hessians),
                "hessians": hessians,
                "study_seed": self.cfg.seed,
                "config_sha256": sha256_json(self.cfg.raw),
                "versions": versions(),
                "machine": machine(),
            },
            timings={"quantize_s": round(t_quant, 2), "eval_s": self.evaluator.timings.get(task.label)},
        )
        return row.to_dict()


def _calibration_summary(h: dict[str, Any] | None) -> str | None:
    if not h:
        return None
    return (
        f"{h['corpus']} {h['windows']}×{h['ctx']} seed {h['seed']} ({h['tokens']} tokens, "
        f"corpus sha256 {str(h['corpus_sha256'])[:12]}…, store key {str(h['key'])[:12]}…)"
    )


def task_of(label: str, tasks: list[TaskSpec]) -> TaskSpec:
    for t in tasks:
        if t.label == label:
            return t
    raise Q2labError(f"internal: record for unknown task {label}")


def _task_dict(task: TaskSpec) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(task)


def _run_ray(cfg: StudyConfig, model: str, todo, store_paths, out: Path, results: Path, log) -> None:
    try:
        import ray
    except ImportError as e:
        raise Q2labError("--ray needs Ray: pip install 'q2lab[ray]'") from e
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True, log_to_driver=False)

    @ray.remote(num_cpus=max(1, (os.cpu_count() or 2) // 2))
    def run_cell(cell: Cell, tasks: list[TaskSpec]) -> list[dict[str, Any]]:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
        return _CellContext(cfg, model, store_paths, out).run(cell, tasks, lambda m: None)

    pending = {run_cell.remote(c, ts): c for c, ts in todo}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        cell = pending.pop(ready[0])
        append_rows(results, ray.get(ready[0]))
        log(f"cell {cell.id} done (ray)")
