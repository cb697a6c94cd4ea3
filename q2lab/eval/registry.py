"""Task kinds (the ``KIND`` of a ``KIND:DATA`` task string) registered by name, like methods.

A kind is a :class:`TaskKind` subclass registered with :func:`register_kind`: its name, its
option handling, how it checks its data before any model is loaded, and how it runs on a
candidate (with the :class:`~q2lab.eval.tasks.Evaluator`'s reference and caches).  The built-in
kinds live in :mod:`q2lab.eval.kinds`, one module each; a new kind is one more module there
(imported by ``kinds/__init__.py``), or any module that registers itself before the task is
parsed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, ClassVar

from q2lab.errors import ConfigError

if TYPE_CHECKING:
    from q2lab.eval.records import Record
    from q2lab.eval.tasks import Evaluator, TaskSpec
    from q2lab.models.loader import LoadedModel


class TaskKind(ABC):
    """One kind of evaluation task.  Subclasses set ``name`` and register with :func:`register_kind`."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    #: The task compares a candidate with the reference: the reference cell gets no rows (KLD).
    compares_to_reference: ClassVar[bool] = False
    #: The task reads ``windows`` (corpus windows); other kinds drop a ``windows`` option.
    uses_windows: ClassVar[bool] = False
    #: The task can score a seeded random subset of its items (``sample: N``, ``seed``).
    samples_items: ClassVar[bool] = False

    def prepare_options(self, opts: dict[str, Any], data: str) -> None:
        """Kind-specific defaults and normalisation of a task's options, in place, before the
        shared checks of :func:`~q2lab.eval.tasks.parse_task`."""
        if not self.uses_windows:
            opts.pop("windows", None)
        if opts.get("sample") is not None and not self.samples_items:
            raise ConfigError(f"task kind {self.name!r} has no 'sample' option (a seeded subset of items)")

    @abstractmethod
    def check_data(self, task: TaskSpec) -> None:
        """Resolve the task's data (and optional dependencies) now, so a typo fails before any
        model is loaded."""

    def language(self, task: TaskSpec) -> str | None:
        """The language of the task's text (ISO 639-1, ``"en+pl"`` for a bilingual set; None:
        unknown), compared with a model's calibration language (:mod:`q2lab.data.language`)."""
        return None

    def shared_pass(self, task: TaskSpec) -> Hashable | None:
        """Tasks whose kinds return the same non-None key run as one pass (ppl and KLD on the
        same windows share one candidate forward pass); None: the task runs alone."""
        return None

    @abstractmethod
    def run(
        self, evaluator: Evaluator, candidate: LoadedModel, tasks: list[TaskSpec], is_reference: bool
    ) -> list[Record]:
        """Records of ``tasks`` (one task, or the tasks of one shared pass, all of which this kind
        handles) for ``candidate``; ``is_reference`` when the candidate is the reference itself."""


_KINDS: dict[str, TaskKind] = {}


def register_kind(cls: type[TaskKind]) -> type[TaskKind]:
    """Class decorator: register a :class:`TaskKind` under its ``name`` (one instance, stateless;
    per-evaluator state lives in :meth:`Evaluator.cache`)."""
    key = cls.name
    if not key or ":" in key or key != key.strip():
        raise RuntimeError(f"task kind name {key!r} must be a non-empty word without ':'")
    if key in _KINDS and type(_KINDS[key]) is not cls:
        raise RuntimeError(f"task kind {key!r} registered twice")
    _KINDS[key] = cls()
    return cls


def _load_builtin_kinds() -> None:
    """Import the modules that register the built-in kinds (cheap; heavy imports are lazy)."""
    from q2lab.eval import kinds  # noqa: F401


def kind_names() -> tuple[str, ...]:
    """Registered kinds, built-ins first in their documented order."""
    _load_builtin_kinds()
    return tuple(_KINDS)


def get_kind(name: str) -> TaskKind:
    """The registered kind ``name``, or a :class:`ConfigError` naming the known ones."""
    _load_builtin_kinds()
    kind = _KINDS.get(name)
    if kind is None:
        raise ConfigError(f"unknown task kind {name!r}; known kinds: {', '.join(_KINDS)}")
    return kind
