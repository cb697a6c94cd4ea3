"""Study runner: grid expansion, shared calibration, resumability, report; the CLI surface."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from q2lab import cli
from q2lab.calib import store as store_mod
from q2lab.errors import ConfigError
from q2lab.study import runner
from q2lab.study.config import parse_study
from tests.tiny import TINY_TEXT, make_tiny_model


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    lm = make_tiny_model("llama")
    lm.model.save_pretrained(root / "tiny")
    lm.tokenizer.save_pretrained(root / "tiny")
    (root / "text.txt").write_text(TINY_TEXT * 40, encoding="utf-8")
    items = [
        {"context": "The quick brown fox", "choices": ["jumps", "sleeps", "sings"], "label": 0},
        {"context": "All that glitters", "choices": ["is not gold", "is silver"], "label": 0},
    ] * 3
    (root / "mc.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")
    (root / "prompts.txt").write_text("The quick brown fox\nLitwo, ojczyzno moja\n", encoding="utf-8")
    return root


def study_yaml(root, **over):
    cfg = {
        "name": "tiny",
        "models": [str(root / "tiny")],
        "calibration": {"corpus": str(root / "text.txt"), "windows": 4, "ctx": 32, "seed": 0},
        "methods": [
            {"method": "fp"},
            {"method": "rtn", "bits": [2, 4], "group_size": 32},
            {"method": "gptq", "bits": 3, "group_size": 32},
        ],
        "tasks": [
            f"ppl:{root / 'text.txt'}",
            f"kld:{root / 'text.txt'}",
            f"mc:{root / 'mc.jsonl'}",
            {"task": f"gen:{root / 'prompts.txt'}", "max_new_tokens": 12},
        ],
        "eval": {"windows": 3, "ctx": 32},
    }
    cfg.update(over)
    path = root / f"study-{len(over)}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_grid_expands_lists_and_validates(workspace):
    cfg = parse_study(yaml.safe_load(study_yaml(workspace).read_text()))
    assert [c.id.split("/")[1].split("-g")[0] for c in cfg.cells] == ["fp", "rtn-b2", "rtn-b4", "gptq-b3"]
    assert cfg.needs_hessians and cfg.tasks[0].windows == 3
    bad = yaml.safe_load(study_yaml(workspace).read_text())
    bad["methods"].append({"method": "rtn", "bits": 12})
    with pytest.raises(ConfigError, match="bits must be"):
        parse_study(bad)
    bad["methods"][-1] = {"method": "nope"}
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        parse_study(bad)
    with pytest.raises(ConfigError, match="unknown key"):
        parse_study({**bad, "modles": []})
    no_calib = yaml.safe_load(study_yaml(workspace).read_text())
    del no_calib["calibration"]
    with pytest.raises(ConfigError, match="no 'calibration' section"):
        parse_study(no_calib)


def test_study_runs_resumes_and_shares_hessians(workspace, monkeypatch):
    calls = {"hessians": 0, "quantize": 0}
    real_stream, real_quant = store_mod.stream_hessians, runner.quantize_model

    def count_stream(*a, **k):
        calls["hessians"] += 1
        return real_stream(*a, **k)

    def count_quant(*a, **k):
        calls["quantize"] += 1
        return real_quant(*a, **k)

    monkeypatch.setattr(store_mod, "stream_hessians", count_stream)
    monkeypatch.setattr(runner, "quantize_model", count_quant)
    monkeypatch.setenv("Q2LAB_CACHE", str(workspace / "cache"))
    out = workspace / "out"
    results = runner.run_study(study_yaml(workspace), out, log=lambda m: None)
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert calls == {"hessians": 1, "quantize": 3}
    cells = {r["cell"] for r in rows}
    assert len(cells) == 4
    fp_rows = [r for r in rows if r["is_reference"]]
    assert fp_rows and all(r["bpw"] == 16.0 for r in fp_rows)
    assert not any(r["metric"].startswith("kld") for r in fp_rows)  # no KLD of the reference to itself
    q2 = [r for r in rows if r["method"] == "rtn" and r["bits"] == 2]
    assert {r["metric"] for r in q2} >= {"ppl", "kld_mean", "top1_agree", "acc", "acc_norm", "collapse_rate"}
    for r in rows:
        assert {"task", "metric", "value", "ci_low", "ci_high", "n", "bpw", "provenance"} <= set(r)
        assert r["provenance"]["versions"]["torch"]
    gptq = next(r for r in rows if r["method"] == "gptq")
    assert gptq["provenance"]["hessians"]["windows"] == 4 and 3 < gptq["bpw"] < 4
    assert (out / "report.md").exists() and (out / "pareto.png").stat().st_size > 1000
    # resume: nothing is recomputed, nothing is appended
    n_lines = len(results.read_text().splitlines())
    logs: list[str] = []
    runner.run_study(study_yaml(workspace), out, log=logs.append)
    assert not any(m.startswith("cell ") for m in logs), logs  # not even the reference's KLD pass
    assert calls == {"hessians": 1, "quantize": 3}
    assert len(results.read_text().splitlines()) == n_lines
    # a new grid point reuses the stored Hessians and only runs the new cell
    bigger = study_yaml(
        workspace, methods=[{"method": "fp"}, {"method": "gptq", "bits": [3, 4], "group_size": 32}]
    )
    runner.run_study(bigger, out, log=lambda m: None)
    assert calls == {"hessians": 1, "quantize": 4}


def test_cli_end_to_end_and_errors(workspace, monkeypatch, capsys):
    monkeypatch.setenv("Q2LAB_CACHE", str(workspace / "cache"))
    model, text = str(workspace / "tiny"), str(workspace / "text.txt")
    assert cli.main(["methods"]) == 0
    assert "gptq" in capsys.readouterr().out
    ck = workspace / "ck"
    code = cli.main(
        [
            "quantize",
            model,
            "--method",
            "gptq",
            "--bits",
            "2",
            "--group-size",
            "32",
            "--corpus",
            text,
            "--windows",
            "4",
            "--ctx",
            "32",
            "--out",
            str(ck),
        ]
    )
    assert code == 0 and (ck / "q2lab_manifest.json").exists()
    out_json = workspace / "eval.json"
    code = cli.main(
        [
            "eval",
            str(ck),
            "--ref",
            model,
            "--task",
            f"ppl:{text}",
            "--task",
            f"kld:{text}",
            "--windows",
            "2",
            "--ctx",
            "32",
            "--json",
            str(out_json),
        ]
    )
    assert code == 0
    recs = json.loads(out_json.read_text())
    assert {r["metric"] for r in recs} == {"ppl", "kld_mean", "kld_median", "kld_p99", "top1_agree"}
    assert all({"task", "metric", "value", "ci_low", "ci_high", "n"} <= set(r) for r in recs)
    capsys.readouterr()
    # user errors: one line, exit status 2, nothing written
    cases = [
        (["quantize", model, "--method", "nope", "--out", str(workspace / "x1")], "unknown method 'nope'"),
        (
            ["quantize", model, "--method", "rtn", "--bits", "0", "--out", str(workspace / "x2")],
            "bits must be",
        ),
        (["eval", str(workspace / "missing"), "--task", f"ppl:{text}"], "does not exist"),
        (["eval", model, "--task", "ppl:nosuchcorpus"], "unknown corpus 'nosuchcorpus'"),
        (["eval", model, "--task", f"kld:{text}"], "needs a reference model"),
        (["eval", model, "--task", "bogus"], "KIND:DATA"),
        (["study", str(workspace / "none.yaml"), "--out", str(workspace / "x3")], "does not exist"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("q2lab: error:") and message in err and "\n" not in err, err
    assert not (workspace / "x1").exists() and not (workspace / "x2").exists()


def test_missing_data_names_the_file_and_variable(monkeypatch, tmp_path):
    from q2lab.data.text import load_corpus
    from q2lab.errors import DataError

    monkeypatch.setenv("Q2LAB_DATA", str(tmp_path))
    with pytest.raises(DataError, match=r"missing data file .*wiki.test.raw \(Q2LAB_DATA selects"):
        load_corpus("wikitext2")
    monkeypatch.delenv("Q2LAB_DATA")
    with pytest.raises(DataError, match="Q2LAB_DATA is not set"):
        load_corpus("wikitext2")


def test_ray_runner_gives_the_same_results(workspace, monkeypatch):
    """Cells as Ray tasks (a local 2-CPU cluster) reproduce the in-process numbers."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'q2lab[ray]')")
    monkeypatch.setenv("Q2LAB_CACHE", str(workspace / "cache"))
    path = study_yaml(
        workspace,
        methods=[{"method": "fp"}, {"method": "gptq", "bits": 3, "group_size": 32}],
        tasks=[f"ppl:{workspace / 'text.txt'}", f"kld:{workspace / 'text.txt'}"],
    )
    local = runner.run_study(path, workspace / "local", log=lambda m: None)
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        remote = runner.run_study(path, workspace / "ray", use_ray=True, log=lambda m: None)
    finally:
        ray.shutdown()

    def values(p):
        return {(r["cell"], r["metric"]): r["value"] for r in map(json.loads, p.read_text().splitlines())}

    a, b = values(local), values(remote)
    assert a.keys() == b.keys() and len(a) >= 6
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-4), key


def test_an_interrupted_cell_keeps_its_finished_tasks(workspace, monkeypatch):
    """Rows are appended task by task: a crash in a cell's last task loses only that task."""
    from q2lab.eval.kinds.gen import GenerationKind
    from q2lab.eval.tasks import Evaluator

    monkeypatch.setenv("Q2LAB_CACHE", str(workspace / "cache"))
    path = study_yaml(workspace, methods=[{"method": "fp"}], name="interrupted")
    out = workspace / "out-interrupted"

    def crash(self, *a, **k):
        raise RuntimeError("power cut")

    monkeypatch.setattr(GenerationKind, "run", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        runner.run_study(path, out, log=lambda m: None)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["task"].split(":")[0] for r in rows} == {"ppl", "mc"}  # the reference has no KLD rows
    monkeypatch.undo()
    monkeypatch.setenv("Q2LAB_CACHE", str(workspace / "cache"))
    ran: list[str] = []
    real_run = Evaluator.run

    def spy(self, candidate, tasks, on_records=None):
        ran.extend(t.kind for t in tasks)
        return real_run(self, candidate, tasks, on_records)

    monkeypatch.setattr(Evaluator, "run", spy)
    runner.run_study(path, out, log=lambda m: None)
    assert "gen" in ran and not {"ppl", "mc"} & set(ran)  # finished tasks are not run again
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert "collapse_rate" in {r["metric"] for r in rows}


def test_entry_labels_name_cells_without_changing_their_ids(tmp_path):
    corpus = tmp_path / "t.txt"
    corpus.write_text("some text " * 50, encoding="utf-8")

    def cells(entry):
        raw = {"name": "s", "models": ["m"], "methods": [entry], "tasks": [f"ppl:{corpus}"]}
        return parse_study(raw).cells

    plain = cells({"method": "rtn", "bits": [2, 3]})
    named = cells({"method": "rtn", "bits": [2, 3], "label": ["two", "three"]})
    assert [c.label for c in named] == ["two", "three"]
    assert [c.id for c in named] == [c.id for c in plain]
    assert [c.label for c in plain] == ["RTN 2b g128", "RTN 3b g128"]
    assert cells({"method": "fp", "label": "float"})[0].label == "float"
    with pytest.raises(ConfigError, match="a list of 2 non-empty strings"):
        cells({"method": "rtn", "bits": [2, 3], "label": "one"})
    with pytest.raises(ConfigError, match="a non-empty string"):
        cells({"method": "rtn", "label": ""})


def _study_values(path) -> dict[tuple, tuple]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {
        (r["cell"], r["task"], r["metric"]): (r["value"], r["ci_low"], r["ci_high"], r["n"]) for r in rows
    }


def test_same_settings_give_identical_records_at_any_thread_count(workspace, monkeypatch):
    """README's reproducibility promise, end to end: Hessians recomputed from scratch (fresh cache),
    quantized, evaluated — twice at 2 threads and once at 1 — give the same values, CIs and counts
    bit for bit.  The tiny model's layers are too small for torch to split across threads, so
    this guards the pipeline (calibration, evaluation, bootstraps, seeds); the one-thread guard of
    the quantizers themselves is tested on shapes that do split (test_reproducibility.py)."""
    methods = [
        {"method": "fp"},
        {"method": "gptq", "bits": 2, "group_size": 32},
        {"method": "qtip", "bits": 2},
    ]
    path = study_yaml(workspace, methods=methods, name="repro")
    before = torch.get_num_threads()
    runs = {}
    try:
        for name, threads in (("a", 2), ("b", 2), ("c", 1)):
            monkeypatch.setenv("Q2LAB_CACHE", str(workspace / f"cache-repro-{name}"))
            torch.set_num_threads(threads)
            runner.run_study(path, workspace / f"repro-{name}", log=lambda m: None)
            runs[name] = _study_values(workspace / f"repro-{name}" / "results.jsonl")
    finally:
        torch.set_num_threads(before)
    assert len(runs["a"]) >= 20 and {k[1].split(":")[0] for k in runs["a"]} == {"ppl", "kld", "mc", "gen"}
    assert runs["a"] == runs["b"]
    assert runs["a"] == runs["c"]
    rows = [json.loads(line) for line in (workspace / "repro-c" / "results.jsonl").read_text().splitlines()]
    assert rows[0]["provenance"]["machine"]["torch_threads"] == 1
