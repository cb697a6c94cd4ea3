"""``harness:DATA``: the same MC items as ``mc:DATA`` scored by lm-eval itself through
:mod:`q2lab.eval.harness` (needs ``q2lab[eval]``), recorded like ``mc:`` with per-item units, so
a report can pair the two scorers item by item."""

from __future__ import annotations

from typing import TYPE_CHECKING

from q2lab.eval.registry import TaskKind, register_kind

if TYPE_CHECKING:
    from q2lab.eval.records import Record
    from q2lab.eval.tasks import Evaluator, TaskSpec
    from q2lab.models.loader import LoadedModel


@register_kind
class HarnessKind(TaskKind):
    name = "harness"
    summary = "the same MC items scored by lm-eval itself (needs q2lab[eval]): acc, acc_norm"

    def check_data(self, task: TaskSpec) -> None:
        from q2lab.data.tasks.mc import load_mc_task
        from q2lab.eval.harness import _require

        load_mc_task(task.data, limit=task.limit)
        _require()

    def language(self, task: TaskSpec) -> str | None:
        from q2lab.data.tasks.mc import mc_language

        return mc_language(task.data)

    def run(
        self, evaluator: Evaluator, candidate: LoadedModel, tasks: list[TaskSpec], is_reference: bool
    ) -> list[Record]:
        import numpy as np

        from q2lab.data.tasks.mc import load_mc_task
        from q2lab.eval.harness import run_harness_mc
        from q2lab.eval.multiple_choice import MCResult, mc_records

        (task,) = tasks
        mc = load_mc_task(task.data, limit=task.limit)
        out = run_harness_mc(candidate, [mc], batch_size=task.batch_size or 8)[mc.name]
        result = MCResult(
            task=mc.name,
            loglik=out.loglik,
            lengths=[np.array([len(c) for c in item.choices], dtype=np.float64) for item in mc.items],
            labels=np.array([item.label for item in mc.items], dtype=np.int64),
            truncated=np.zeros(len(mc.items), dtype=bool),
        )
        records = mc_records(task.label, mc, result)
        for r in records:
            r.details["scorer"] = "lm-eval HFLM (simple_evaluate)"
        return records
