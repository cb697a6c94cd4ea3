"""``mc:DATA``: multiple choice (a named task or a generic .jsonl path) scored by q2lab's
lm-eval-convention scorer: acc, acc_norm, with per-item units."""

from __future__ import annotations

from typing import TYPE_CHECKING

from q2lab.eval.registry import TaskKind, register_kind

if TYPE_CHECKING:
    from q2lab.eval.records import Record
    from q2lab.eval.tasks import Evaluator, TaskSpec
    from q2lab.models.loader import LoadedModel


@register_kind
class MultipleChoiceKind(TaskKind):
    name = "mc"
    summary = "multiple choice (name or generic .jsonl path): acc, acc_norm"

    def check_data(self, task: TaskSpec) -> None:
        from q2lab.data.tasks.mc import load_mc_task

        load_mc_task(task.data, limit=task.limit)

    def language(self, task: TaskSpec) -> str | None:
        from q2lab.data.tasks.mc import mc_language

        return mc_language(task.data)

    def run(
        self, evaluator: Evaluator, candidate: LoadedModel, tasks: list[TaskSpec], is_reference: bool
    ) -> list[Record]:
        from q2lab.data.tasks.mc import load_mc_task
        from q2lab.eval.multiple_choice import mc_records, score_mc

        (task,) = tasks
        mc = load_mc_task(task.data, limit=task.limit)
        kw = {"batch_size": task.batch_size} if task.batch_size else {}
        return mc_records(task.label, mc, score_mc(candidate, mc, **kw))
