"""``auto`` (q2lab/quant/auto.py): the knapsack against brute force, the budget as an upper bound,
the plan as a ``mixed`` config that reproduces the model, the sensitivity cache, bad input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import yaml

from q2lab.errors import ConfigError
from q2lab.quant import auto as auto_mod
from q2lab.quant import make_config
from q2lab.quant.auto import UNITS, allocate
from q2lab.quant.linear import QuantLinear
from q2lab.quant.model import quantize_model
from tests.tiny import make_tiny_model

CANDIDATES = [{"method": "rtn", "bits": 2, "group_size": 32}, {"method": "gptq", "bits": 4}, {"method": "fp"}]


def _brute(options: dict, budget: int) -> float:
    names = list(options)
    best = np.inf
    for combo in itertools.product(*(range(len(options[n])) for n in names)):
        bits = sum(options[n][i][0] for n, i in zip(names, combo))
        if bits <= budget:
            best = min(best, sum(options[n][i][1] for n, i in zip(names, combo)))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_allocation_is_the_knapsack_optimum(seed):
    """With the budget at UNITS bits the costs are exact integers: the DP finds the brute-force optimum."""
    rng = np.random.default_rng(seed)
    options = {}
    for k in range(6):
        bits = sorted(rng.integers(5_000, 30_000, size=3).tolist())
        losses = sorted(rng.random(3).tolist(), reverse=True)
        options[f"l{k}"] = list(zip(bits, losses))
    choice = allocate(options, UNITS)
    bits = sum(options[n][i][0] for n, i in choice.items())
    loss = sum(options[n][i][1] for n, i in choice.items())
    assert bits <= UNITS and loss == pytest.approx(_brute(options, UNITS), abs=1e-12)


def test_costs_round_up_so_the_budget_always_holds():
    options = {f"l{k}": [(1001, 1.0), (3001, 0.0)] for k in range(7)}
    budget = 7 * 1001 + 3 * 2000  # three upgrades fit exactly... in real bits, not after rounding up
    choice = allocate(options, budget)
    assert sum(options[n][i][0] for n, i in choice.items()) <= budget


@pytest.fixture(scope="module")
def setup(tiny_calibrated):
    return tiny_calibrated[1]


def _auto(store, budget, monkeypatch, tmp_path, candidates=CANDIDATES):
    monkeypatch.setenv("Q2LAB_CACHE", str(tmp_path / "cache"))
    lm = make_tiny_model("llama")
    cfg = make_config("auto", {"budget": budget, "candidates": candidates, "sensitivity": "proxy"})
    report = quantize_model(lm.model, "auto", cfg, store)
    return lm, report


def test_the_plan_is_kept_and_reproduced_by_mixed(setup, monkeypatch, tmp_path):
    lm, report = _auto(setup, 6.0, monkeypatch, tmp_path)
    stats = report.plan["stats"]
    assert stats["plan_bpw"] <= 6.0 and stats["range_bpw"][0] < 6.0 < stats["range_bpw"][1]
    assert set(stats["linears"]) <= {"rtn 2b", "gptq 4b", "fp"} and len(stats["linears"]) >= 2
    # what was stored is what the plan counted: quantized bits + 16 per float weight
    n_float = sum(
        m.weight.numel()
        for n, m in lm.model.named_modules()
        if isinstance(m, torch.nn.Linear) and "layers" in n
    )
    n_all = report.quantized_params + n_float
    assert (report.bits + 16 * n_float) / n_all == pytest.approx(stats["plan_bpw"], rel=1e-12)
    # the plan is a mixed config: the same quantization, read back from YAML
    plan = yaml.safe_load(yaml.safe_dump({k: v for k, v in report.plan.items() if k != "stats"}))
    again = make_tiny_model("llama")
    quantize_model(
        again.model, "mixed", make_config("mixed", {k: v for k, v in plan.items() if k != "method"}), setup
    )
    a = {n: m for n, m in lm.model.named_modules() if isinstance(m, QuantLinear)}
    b = {n: m for n, m in again.model.named_modules() if isinstance(m, QuantLinear)}
    assert a.keys() == b.keys() and all(
        torch.equal(a[n].q_codes, b[n].q_codes) for n in a if hasattr(a[n], "q_codes")
    )
    # a larger budget never predicts a larger loss
    _, richer = _auto(setup, 9.0, monkeypatch, tmp_path)
    assert richer.plan["stats"]["predicted_loss"] <= stats["predicted_loss"]


def test_sensitivity_is_measured_once_per_store_and_candidate(setup, monkeypatch, tmp_path):
    _auto(setup, 6.0, monkeypatch, tmp_path)

    def fail(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(auto_mod, "_measure", fail)
    _, report = _auto(setup, 5.0, monkeypatch, tmp_path)
    assert report.plan["stats"]["plan_bpw"] <= 5.0


def test_checkpoint_carries_the_plan(setup, monkeypatch, tmp_path):
    from q2lab.export.checkpoint import PLAN_FILE, save_checkpoint

    lm, report = _auto(setup, 6.0, monkeypatch, tmp_path)
    save_checkpoint(lm, tmp_path / "ckpt", report.to_dict())
    plan = yaml.safe_load((tmp_path / "ckpt" / PLAN_FILE).read_text())
    assert plan["method"] == "mixed" and plan["base"]["method"] in {"rtn", "gptq"}


def test_bad_input_fails_with_one_clear_line(setup, monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="below the cheapest allocation"):
        _auto(setup, 1.0, monkeypatch, tmp_path)
    with pytest.raises(ConfigError, match="reaches the most expensive allocation"):
        _auto(setup, 16.0, monkeypatch, tmp_path)
    with pytest.raises(ConfigError, match="unknown method 'quipp'"):
        make_config("auto", {"candidates": [{"method": "quipp", "bits": 2}, {"method": "fp"}]})
    with pytest.raises(ConfigError, match="at least 2 method entries"):
        make_config("auto", {"candidates": [{"method": "rtn", "bits": 2}]})
    with pytest.raises(ConfigError, match="cannot be auto itself"):
        make_config("auto", {"candidates": [{"method": "auto"}, {"method": "fp"}]})


def test_a_study_reads_a_list_valued_option_as_one_value_and_a_list_of_lists_as_a_sweep():
    from q2lab.study.config import parse_study

    two = [{"method": "rtn", "bits": 2}, {"method": "fp"}]
    raw = {
        "name": "t",
        "models": ["m"],
        "calibration": {"corpus": "wikitext2"},
        "methods": [{"method": "auto", "budget": [3.0, 4.0], "candidates": two}],
        "tasks": ["ppl:wikitext2"],
    }
    assert len(parse_study(raw).cells) == 2
    raw["methods"] = [{"method": "auto", "candidates": [two, [*two, {"method": "rtn", "bits": 4}]]}]
    cells = parse_study(raw).cells
    assert [len(c.config.candidates) for c in cells] == [2, 3]


def test_kld_probes_measure_one_linear_at_a_time(setup, monkeypatch, tmp_path):
    """A probe is the model's KLD to float with that linear alone quantized (checked against
    torch's own kl_div); the rescaled table keeps each linear's proxy ratios and puts the
    cheapest candidate's loss at its probe; ``sensitivity: kld`` plans with it."""
    import torch.nn.functional as F

    from q2lab.models.arch import find_decoder
    from q2lab.quant.mixed import parse_entry

    monkeypatch.setenv("Q2LAB_CACHE", str(tmp_path / "cache"))
    lm = make_tiny_model("llama")
    vocab = lm.model.config.vocab_size
    windows = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    rule = parse_entry(CANDIDATES[0], "candidate 1", False, "auto")
    probes = auto_mod.kld_probes(lm.model, setup, rule, windows)
    layout = find_decoder(lm.model)
    name = layout.full_name(1, "mlp.down_proj")
    assert set(probes) == {
        layout.full_name(b, n) for b in range(len(layout)) for n in layout.block_linears(b)
    }
    assert all(v >= 0 for v in probes.values()) and max(probes.values()) > 0
    with torch.no_grad():  # the oracle: quantize that one linear by hand, torch's KL
        ref = F.log_softmax(lm.model(input_ids=windows).logits[:, :-1], -1)
        linear = lm.model.get_submodule(name)
        saved = linear.weight.data.clone()
        cfg = make_config("rtn", {"bits": 2, "group_size": 32})
        from q2lab.quant import get_quantizer

        linear.weight.data = (
            get_quantizer("rtn").quantize(saved, setup.hessian(name), cfg).dequantize(torch.float32)
        )
        lp = F.log_softmax(lm.model(input_ids=windows).logits[:, :-1], -1)
        linear.weight.data = saved
    oracle = F.kl_div(lp.reshape(-1, vocab), ref.reshape(-1, vocab), log_target=True, reduction="batchmean")
    assert probes[name] == pytest.approx(float(oracle), rel=1e-4)
    other = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(1))
    some = auto_mod.kld_probes(lm.model, setup, rule, other, blocks=[1])  # only block 1's linears
    assert set(some) == {layout.full_name(1, n) for n in layout.block_linears(1)}
    full = auto_mod.kld_probes(lm.model, setup, rule, other)  # the rest joins the same cache file
    assert len(full) == len(probes) and all(full[n] == v for n, v in some.items())
    assert auto_mod.kld_probes(lm.model, setup, rule, other, blocks=[1]) == some  # read back

    table = {"a": [(2, 4.0), (4, 1.0), (16, 0.0)], "b": [(2, 2.0), (4, 0.5), (16, 0.0)]}
    scaled = auto_mod.probe_scaled(table, {"a": 0.1, "b": 0.3}, 0)
    assert scaled["a"] == [(2, pytest.approx(0.1)), (4, pytest.approx(0.025)), (16, 0.0)]
    assert scaled["b"][1][1] == pytest.approx(0.075)

    cfg = make_config("auto", {"budget": 6.0, "candidates": CANDIDATES})  # kld: the default
    with pytest.raises(ConfigError, match="sensitivity kld needs calibration windows"):
        quantize_model(make_tiny_model("llama").model, "auto", cfg, setup)
    report = quantize_model(
        make_tiny_model("llama").model, "auto", cfg, setup, windows=lambda n=None, ctx=None: windows[:n]
    )
    assert report.plan["stats"]["sensitivity"] == "kld" and report.plan["stats"]["plan_bpw"] <= 6.0
    with pytest.raises(ConfigError, match="sensitivity must be one of kld, proxy"):
        make_config("auto", {"candidates": CANDIDATES, "sensitivity": "fisher"})
