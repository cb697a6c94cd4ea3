"""``ifeval:DATA``: IFEval (the staged prompts or a path): prompt- and instruction-level strict
and loose accuracy; the chat template for instruct models; resumable answers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from q2lab.eval.registry import TaskKind, register_kind

if TYPE_CHECKING:
    from q2lab.eval.records import Record
    from q2lab.eval.tasks import Evaluator, TaskSpec
    from q2lab.models.loader import LoadedModel


@register_kind
class IFEvalKind(TaskKind):
    name = "ifeval"
    summary = "IFEval: prompt/instruction-level strict and loose accuracy"
    samples_items = True

    def prepare_options(self, opts: dict[str, Any], data: str) -> None:
        super().prepare_options(opts, data)
        if "max_new_tokens" not in opts:
            from q2lab.eval.ifeval import DEFAULT_MAX_NEW_TOKENS

            opts["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS

    def check_data(self, task: TaskSpec) -> None:
        from q2lab.eval.ifeval import _registry, load_ifeval

        load_ifeval(task.data, limit=task.limit, sample=task.sample, seed=task.seed)
        _registry()

    def language(self, task: TaskSpec) -> str | None:
        """The staged IFEval prompts are English; a local file's language is not guessed."""
        return "en" if task.data == "ifeval" else None

    def run(
        self, evaluator: Evaluator, candidate: LoadedModel, tasks: list[TaskSpec], is_reference: bool
    ) -> list[Record]:
        """IFEval answers are the longest generation q2lab runs: with a workdir, finished
        answers go to a resume file per candidate and task, so an interrupted run continues."""
        from q2lab.eval.ifeval import ifeval_records, load_ifeval, run_ifeval

        (task,) = tasks
        data = load_ifeval(task.data, limit=task.limit, sample=task.sample, seed=task.seed)
        resume = evaluator.resume_file(candidate, task, "ifeval")
        run = run_ifeval(
            candidate,
            data,
            max_new_tokens=task.max_new_tokens,
            chat=task.chat,
            batch_size=task.batch_size or 8,
            resume=resume,
        )
        return ifeval_records(task.label, data, run)
