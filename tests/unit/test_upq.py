"""UPQ (q2lab/quant/upq.py, q2lab/finetune/qat.py): the SEQ INT2 grid against closed forms, the
generalized JSD against closed-form values and its KL limits, stage 2 by rounding and by
distillation on the tiny Llama, resuming a run, the self-generated data, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from q2lab.data.text import corpus_windows, load_corpus
from q2lab.errors import ConfigError, DataError
from q2lab.finetune import finetuner
from q2lab.finetune.qat import DistillSet, SEQTrainLinear, schedule
from q2lab.finetune.train import generalized_jsd, topk_jsd, topk_kl
from q2lab.quant import make_config, uniform
from q2lab.quant.linear import QuantLinear
from q2lab.quant.model import quantize_model
from tests.tiny import make_tiny_model

QAT = {"data": "text", "sequences": 12, "ctx": 32, "steps": 24, "micro_batch": 2, "lr": 1e-4, "topk": 16}


# --------------------------------------------------------------------------- SEQ grid
def test_seq_levels_and_exact_bits():
    """Levels are ±½s and ±1½s (no zero level), one fp16 step per group: 2 + 16/g bpw exactly."""
    torch.manual_seed(0)
    w = torch.randn(16, 256)
    layout = uniform.GroupLayout.make(256, 128)
    scales = uniform.seq_fit(w, 2, layout)
    qt = uniform.seq_encode("upq", w, scales, 2, layout, {})
    assert qt.bpw() == 2 + 16 / 128
    levels = uniform.decode(qt) / layout.expand(scales)
    assert set(levels.round(decimals=4).unique().tolist()) == {-1.5, -0.5, 0.5, 1.5}
    # the nearest level: no other level of the grid is closer to any weight
    grid = torch.tensor([-1.5, -0.5, 0.5, 1.5])[None, None, :] * layout.expand(scales)[..., None]
    best = (grid - w[..., None]).abs().min(-1).values
    assert torch.allclose((uniform.decode(qt) - w).abs(), best, atol=1e-6)


def test_seq_fit_reaches_the_gaussian_optimum():
    """The best 4-level uniform quantizer of N(0, 1) has step 0.996 and MSE 0.1188 (Max, 1960);
    the fitted SEQ grid on a long Gaussian row comes within 1 % of it."""
    torch.manual_seed(1)
    w = torch.randn(4, 65536)
    layout = uniform.GroupLayout.make(w.shape[1], None)
    scales = uniform.seq_fit(w, 2, layout)
    mse = (uniform.decode(uniform.seq_encode("upq", w, scales, 2, layout, {})) - w).pow(2).mean(1)
    assert torch.allclose(mse / w.var(1), torch.full_like(mse, 0.1188), rtol=0.01)
    assert torch.allclose(scales.squeeze(1), torch.full((4,), 0.996), rtol=0.03)


def test_fake_quant_seq_forward_and_lsq_gradients():
    """Forward = the stored decode; ∂ŵ/∂w is 1 inside the grid's range and 0 past it; ∂ŵ/∂s is
    (level − w/s) inside and the clamped level outside (LSQ)."""
    s = torch.tensor([[0.5]], requires_grad=True)
    w = torch.tensor([[0.1, -0.6, 0.74, 2.0, -3.0]], requires_grad=True)
    layout = uniform.GroupLayout.make(5, None)
    out = uniform.fake_quant_seq(w, s, 2, layout)
    stored = uniform.decode(uniform.seq_encode("upq", w.detach(), s.detach(), 2, layout, {}))
    assert torch.equal(out.detach(), stored)
    out.sum().backward()
    assert w.grad.tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0]]
    u = w.detach() / 0.5
    level = torch.clamp(torch.floor(u), -2, 1) + 0.5
    inside = (u >= -2) & (u < 2)
    expected = torch.where(inside, level - u, level).sum()
    assert s.grad.item() == pytest.approx(float(expected), abs=1e-6)


# --------------------------------------------------------------------------- the loss
def _kl(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.exp() * (a - b)).sum())


def test_generalized_jsd_closed_form_and_limits():
    f64 = torch.float64
    p, q = torch.tensor([0.2, 0.8], dtype=f64).log(), torch.tensor([0.6, 0.4], dtype=f64).log()
    m = torch.tensor([0.4, 0.6], dtype=f64).log()
    assert float(generalized_jsd(p, q, 0.5)) == pytest.approx(0.5 * _kl(p, m) + 0.5 * _kl(q, m), rel=1e-12)
    # β = 0.3 by hand: m = 0.3 p + 0.7 q
    m3 = (0.3 * p.exp() + 0.7 * q.exp()).log()
    assert float(generalized_jsd(p, q, 0.3)) == pytest.approx(0.3 * _kl(p, m3) + 0.7 * _kl(q, m3), rel=1e-12)
    assert float(generalized_jsd(p, q, 0.5)) <= math.log(2)
    eps = 1e-6
    assert float(generalized_jsd(p, q, eps)) / eps == pytest.approx(_kl(p, q), rel=1e-4)
    assert float(generalized_jsd(p, q, 1 - eps)) / eps == pytest.approx(_kl(q, p), rel=1e-4)
    assert float(generalized_jsd(p, q, 0.0)) == pytest.approx(_kl(p, q), rel=1e-12)
    assert float(generalized_jsd(p, q, 1.0)) == pytest.approx(_kl(q, p), rel=1e-12)
    assert float(generalized_jsd(p, p, 0.5)) == pytest.approx(0.0, abs=1e-15)


def test_topk_jsd_with_the_whole_vocabulary_is_the_full_jsd():
    torch.manual_seed(2)
    t, s = torch.randn(5, 11), torch.randn(5, 11)
    lp, idx = torch.log_softmax(t, -1).topk(11, -1)
    full = generalized_jsd(torch.log_softmax(t, -1), torch.log_softmax(s, -1), 0.4).mean()
    assert float(topk_jsd(s, lp, idx, 0.4)) == pytest.approx(float(full), rel=1e-5)
    assert float(topk_jsd(s, lp, idx, 0.0)) == pytest.approx(float(topk_kl(s, lp, idx)), rel=1e-6)
    # top-3 coarsening: a lower bound
    lp3, idx3 = torch.log_softmax(t, -1).topk(3, -1)
    assert float(topk_jsd(s, lp3, idx3, 0.4)) <= float(full) + 1e-7


# --------------------------------------------------------------------------- the method
@pytest.fixture(scope="module")
def setup(tiny_calibrated, tiny_text_file):
    ref, store = tiny_calibrated
    test = corpus_windows(ref, load_corpus(str(tiny_text_file)), 4, 48, mode="sequential")
    return ref, store, test


def _upq(setup, qat: dict | None, workdir=None, **opts):
    ref, store, _ = setup
    lm = make_tiny_model("llama")
    cfg = make_config("upq", {"group_size": 32, **opts, "qat": qat})
    report = quantize_model(lm.model, "upq", cfg, store, tuner=finetuner(ref, store, cfg, workdir=workdir))
    return lm, report


@torch.no_grad()
def _kld(ref, model, x: torch.Tensor) -> float:
    lp = torch.log_softmax(ref.model(x).logits, -1)
    lq = torch.log_softmax(model(x).logits, -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def _layers(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_max_init_is_the_papers_step():
    """init 'max': UPQ's Δ = max|w| per row (group_size null), step Δ/2 at 2 bits."""
    from q2lab.quant.upq import seq_init

    w = torch.tensor([[0.4, -2.0, 1.0, 0.1], [0.5, 0.25, -0.125, 0.0]])
    cfg = make_config("upq", {"group_size": None, "init": "max"})
    assert seq_init(w, cfg).tolist() == [[1.0], [0.25]]
    with pytest.raises(ConfigError, match="init must be 'mse' or 'max'"):
        make_config("upq", {"init": "min"})


def test_upq_without_qat_is_int2_seq_at_exact_bpw(setup):
    lm, report = _upq(setup, None)
    layers = _layers(lm.model)
    assert layers and all(m.meta["upq_stage"] == 2 and m.meta["grid"] == "seq" for m in layers.values())
    assert all(lr.bpw == 2 + 16 / 32 for lr in report.layers)
    assert report.bpw == 2.5 and any("by rounding" in n for n in report.notes)
    assert all(lr.proxy_rel is not None for lr in report.layers)  # stage 2 happened at quantize time


def test_qat_lowers_the_divergence_to_the_float_model(setup, tmp_path):
    ref, _, test = setup
    plain, _ = _upq(setup, None)
    tuned, report = _upq(setup, QAT, workdir=tmp_path)
    st = report.finetune
    assert st["valid_jsd_after"] < 0.8 * st["valid_jsd_before"]
    assert _kld(ref, tuned.model, test) < _kld(ref, plain.model, test)
    layers = _layers(tuned.model)
    assert not any(isinstance(m, SEQTrainLinear) for m in tuned.model.modules())
    assert all(m.meta["upq_stage"] == 2 for m in layers.values()) and report.bpw == 2.5
    assert all(lr.proxy_rel is None for lr in report.layers)  # the INT4 → INT2 step changed the format
    assert st["tokens_per_s"] > 0 and st["peak_rss_mb"] > 0 and st["steps_run"] == QAT["steps"]
    # frozen for training, then given back their flags (a fresh model's parameters require grad)
    assert all(p.requires_grad for p in tuned.model.get_input_embeddings().parameters())
    # a UPQ model is saved as a q2lab checkpoint and loads back computing the same logits
    from q2lab.export.checkpoint import save_checkpoint
    from q2lab.models import load_model

    with torch.no_grad():
        before = tuned.model(test).logits
    save_checkpoint(tuned, tmp_path / "ckpt", report.to_dict())
    with torch.no_grad():
        assert torch.equal(load_model(str(tmp_path / "ckpt")).model(test).logits, before)


def test_resumed_training_takes_the_same_path(setup, tmp_path):
    """Four steps straight = two steps, then the same run asked for four (resumed from its state)."""
    qat = {**QAT, "steps": 4, "save_every": 2}
    straight, _ = _upq(setup, qat, workdir=tmp_path / "a")
    _upq(setup, {**qat, "steps": 2}, workdir=tmp_path / "b")
    resumed, report = _upq(setup, qat, workdir=tmp_path / "b")
    assert report.finetune["resumed_at"] == 2 and report.finetune["steps_run"] == 2
    a, b = _layers(straight.model), _layers(resumed.model)
    for name in a:
        assert torch.equal(a[name].q_codes, b[name].q_codes) and torch.equal(
            a[name].q_scales, b[name].q_scales
        )


def test_schedule_is_a_pure_function_of_the_step():
    seen = [i for step in range(6) for i in schedule(5, step, 2, seed=3)]
    assert sorted(seen[:5]) == list(range(5)) and sorted(seen[5:10]) == list(range(5))
    assert schedule(5, 4, 2, seed=3) == schedule(5, 4, 2, seed=3)


# --------------------------------------------------------------------------- self-generated data
def test_teacher_data_answers_the_seed_prompts_and_is_cached(data_root, monkeypatch, tmp_path):
    from q2lab.eval.distill import teacher_data
    from q2lab.quant.finetune_option import QATConfig

    tiny = make_tiny_model("llama", max_position_embeddings=2048)  # IFEval prompts are long in bytes
    monkeypatch.setenv("Q2LAB_CACHE", str(tmp_path))
    qat = QATConfig(sequences=3, max_new_tokens=6, lang="en", temperature=None)
    build = teacher_data(tiny, qat)
    data = build()
    assert data.info["rendering"] == "user/assistant frame"  # the tiny model has no chat template
    assert len(data.sequences) == 3 and all(0 < data.positions(i) <= 7 for i in range(3))
    for seq, start in zip(data.sequences, data.starts):
        prompt_end = tiny.tokenizer.decode(seq[: start + 1].tolist())
        assert prompt_end.rstrip().endswith("Assistant:")
    assert build().sha256 == data.sha256 and len(list(tmp_path.glob("distill/*.pt"))) == 1


def test_distill_prompts_avoid_every_evaluated_prompt(data_root):
    from q2lab.data.tasks.chat_suite import IFEVAL_SCORED, build_chat_suite
    from q2lab.data.tasks.distill_prompts import distill_prompts
    from q2lab.eval.ifeval import load_ifeval

    d = distill_prompts(300, seed=0)
    texts = {p.text for p in d.prompts}
    assert not texts & {p.text for p in build_chat_suite(0).prompts}
    scored = load_ifeval(sample=IFEVAL_SCORED["sample"], seed=IFEVAL_SCORED["seed"])
    assert not texts & {item.prompt for item in scored.items}
    assert {p.use for p in d.prompts} == {"dialogue", "instruction", "summarization", "longform"}
    assert distill_prompts(300, seed=0).sha256 == d.sha256 != distill_prompts(300, seed=1).sha256
    assert all(p.lang == "en" for p in distill_prompts(40, lang="en").prompts)


# --------------------------------------------------------------------------- bad input
def test_bad_input_fails_with_one_clear_line(setup, tmp_path):
    ref, store, _ = setup
    with pytest.raises(ConfigError, match=r"qat.beta must be in \[0, 1\]"):
        make_config("upq", {"qat": {"beta": 1.2}})
    with pytest.raises(ConfigError, match="stage1_bits must be an integer above bits"):
        make_config("upq", {"bits": 2, "stage1_bits": 2})
    cfg = make_config("upq", {"qat": {"data": "self"}})
    with pytest.raises(ConfigError, match="needs the teacher's answers"):
        finetuner(ref, store, cfg)
    with pytest.raises(DataError, match="the distillation set is empty"):
        DistillSet((), ())
    bad = tmp_path / "set.pt"
    bad.write_bytes(b"not a tensor file")
    with pytest.raises(DataError, match="not a q2lab distillation set"):
        DistillSet.load(bad)


def test_a_study_cell_distils_on_the_teachers_answers(tmp_path, tiny_text_file, monkeypatch):
    """The runner hands the self-generated data to the tuner: a UPQ + QAT cell on the tiny model
    (seed prompts replaced by short ones, the tiny model's context being 256 tokens)."""
    import json

    import yaml

    from q2lab.data.tasks import distill_prompts as dp
    from q2lab.data.tasks.chat_suite import _prompt, suite_sha256
    from q2lab.eval import distill
    from q2lab.study import runner

    short = tuple(
        _prompt(f"p{i}", "en", "dialogue", "test", f"Tell me about the number {i}.") for i in range(6)
    )
    monkeypatch.setattr(
        distill, "distill_prompts", lambda n, seed, lang: dp.DistillPrompts(short, seed, suite_sha256(short))
    )
    monkeypatch.setenv("Q2LAB_CACHE", str(tmp_path / "cache"))
    lm = make_tiny_model("llama")
    lm.model.save_pretrained(tmp_path / "tiny")
    lm.tokenizer.save_pretrained(tmp_path / "tiny")
    qat = {"sequences": 6, "max_new_tokens": 8, "steps": 3, "micro_batch": 2, "lr": 1e-4, "topk": 8}
    cfg = {
        "name": "upq-tiny",
        "models": [str(tmp_path / "tiny")],
        "calibration": {"corpus": str(tiny_text_file), "windows": 4, "ctx": 32, "seed": 0},
        "methods": [{"method": "fp"}, {"method": "upq", "group_size": 32, "qat": qat}],
        "tasks": [f"kld:{tiny_text_file}"],
        "eval": {"windows": 2, "ctx": 32},
    }
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg))
    results = runner.run_study(tmp_path / "s.yaml", tmp_path / "out", log=lambda m: None)
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    upq = next(r for r in rows if r["method"] == "upq")
    assert upq["bpw"] == 2.5
    stats = upq["quant"]["finetune"]  # the record says what the student was distilled on
    assert stats["data"]["kind"] == "self" and len(stats["data"]["sha256"]) == 64
    assert stats["steps_run"] == 3 and stats["data"]["rendering"] == "user/assistant frame"
    assert len(list((tmp_path / "cache" / "distill").glob("*.pt"))) == 1  # the teacher's answers, cached
    assert not list((tmp_path / "cache" / "qat").rglob("state.pt"))  # a finished run's state is gone
