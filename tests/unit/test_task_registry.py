"""Task kinds are registered by name (q2lab.eval.registry), like methods: the Evaluator and the
task parser look them up, and a new kind is one module that registers itself."""

from __future__ import annotations

import pytest

from q2lab.errors import ConfigError
from q2lab.eval import registry
from q2lab.eval.records import Record
from q2lab.eval.registry import TaskKind, get_kind, kind_names, register_kind
from q2lab.eval.tasks import Evaluator, TaskSpec, check_data, parse_task

BUILTIN = ("ppl", "kld", "mc", "gen", "harness", "ifeval")


@pytest.fixture()
def scratch_registry(monkeypatch):
    """Kinds registered in a test vanish after it."""
    kind_names()  # the built-ins first, as in any process
    monkeypatch.setattr(registry, "_KINDS", dict(registry._KINDS))


def test_builtin_kinds_in_their_documented_order():
    assert kind_names()[: len(BUILTIN)] == BUILTIN
    assert [get_kind(k).name for k in BUILTIN] == list(BUILTIN)
    assert get_kind("ppl").uses_windows and get_kind("kld").uses_windows and not get_kind("mc").uses_windows
    assert [k for k in BUILTIN if get_kind(k).compares_to_reference] == ["kld"]


def test_unknown_kind_names_the_known_ones():
    with pytest.raises(ConfigError) as e:
        parse_task("bleu:wmt")
    assert str(e.value) == (
        "task 'bleu:wmt' must look like KIND:DATA with KIND one of ppl, kld, mc, gen, harness, ifeval"
    )
    with pytest.raises(ConfigError, match="unknown task kind 'bleu'; known kinds: ppl, kld, mc, gen"):
        Evaluator(None).run(object(), [TaskSpec("bleu", "wmt")])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown task kind"):
        check_data(TaskSpec("bleu", "wmt"))


def test_kind_options_are_unchanged():
    """Task strings parse to the same TaskSpec (and resume keys) as before the registry."""
    assert parse_task("ppl:wikitext2", windows=8) == TaskSpec("ppl", "wikitext2", windows=8)
    assert parse_task("mc:hellaswag", windows=8) == TaskSpec("mc", "hellaswag")  # windows: ppl/kld only
    assert parse_task("ifeval:ifeval").max_new_tokens > TaskSpec("ifeval", "ifeval").max_new_tokens
    assert parse_task({"task": "ifeval:ifeval", "max_new_tokens": 5}).max_new_tokens == 5
    assert parse_task("gen:collapse").key() == TaskSpec("gen", "collapse").key()
    assert not TaskSpec("kld", "w").applies_to(True) and TaskSpec("kld", "w").applies_to(False)
    assert TaskSpec("ppl", "w").applies_to(True)


def test_a_new_kind_is_one_registered_class(scratch_registry):
    calls: list[list[str]] = []

    @register_kind
    class Echo(TaskKind):
        name = "echo"

        def prepare_options(self, opts, data):
            super().prepare_options(opts, data)
            opts.setdefault("limit", 3)

        def check_data(self, task):
            if task.data == "missing":
                raise ConfigError("no such data")

        def shared_pass(self, task):
            return ("echo", task.ctx)

        def run(self, evaluator, candidate, tasks, is_reference):
            calls.append([t.label for t in tasks])
            evaluator.cache("echo")["seen"] = evaluator.cache("echo").get("seen", 0) + 1
            return [Record(t.label, "len", float(len(t.data)), 0.0, 0.0, t.limit or 0) for t in tasks]

    assert "echo" in kind_names()
    a, b, c = parse_task("echo:a"), parse_task("echo:bbb"), parse_task({"task": "echo:cc", "ctx": 8})
    assert a.limit == 3 and a.windows == 32
    check_data(a)
    with pytest.raises(ConfigError, match="no such data"):
        check_data(parse_task("echo:missing"))
    ev = Evaluator(None)
    seen: list[list[str]] = []
    recs = ev.run(object(), [a, b, c], on_records=lambda rs: seen.append([r.task for r in rs]))  # type: ignore[arg-type]
    assert calls == [["echo:a", "echo:bbb"], ["echo:cc"]]  # a shared pass per key
    assert [r.value for r in recs] == [1.0, 3.0, 2.0] and ev.cache("echo")["seen"] == 2
    assert seen == [["echo:a", "echo:bbb"], ["echo:cc"]] and set(ev.timings) == {"echo:a", "echo:cc"}
    with pytest.raises(RuntimeError, match="registered twice"):

        @register_kind
        class Echo2(Echo):
            name = "echo"
