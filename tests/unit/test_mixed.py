"""``mixed``: a method per linear by name pattern.  The oracle is each method run alone: a linear
a rule routes to method M must end up exactly as M quantizes it over the whole model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from q2lab.errors import ConfigError
from q2lab.quant.base import make_config
from q2lab.quant.linear import QuantLinear
from q2lab.quant.model import quantize_model
from tests.tiny import checkpoint_logits, make_tiny_model

RULES = [
    {"match": r"mlp\.down_proj", "method": "rtn", "bits": 4, "group_size": 32},
    {"match": r"layers\.0\.self_attn\.v_proj", "method": "fp"},
    {"match": r"q_proj", "method": "q8_0"},
]
BASE = {"method": "rtn", "bits": 2, "group_size": 32}


def _mixed():
    return make_config("mixed", {"base": BASE, "rules": RULES})


def _weights(lm) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in lm.model.named_modules():
        if isinstance(m, QuantLinear):
            out[name] = m.weight_dequantized(torch.float32)
        elif isinstance(m, nn.Linear) and ".layers." in name:
            out[name] = m.weight.detach().clone()
    return out


def test_each_linear_is_exactly_what_its_method_gives_alone() -> None:
    lm = make_tiny_model(seed=1)
    report = quantize_model(lm.model, "mixed", _mixed())
    mixed = _weights(lm)
    alone = {}
    for method, opts in (("rtn", {"bits": 4, "group_size": 32}), ("q8_0", {}), ("rtn", BASE | {})):
        ref = make_tiny_model(seed=1)
        quantize_model(
            ref.model, method, make_config(method, {k: v for k, v in opts.items() if k != "method"})
        )
        alone[(method, opts.get("bits"))] = _weights(ref)
    float_ref = _weights(make_tiny_model(seed=1))
    for name, w in mixed.items():
        if "down_proj" in name:
            expected = alone[("rtn", 4)][name]
        elif name.endswith("layers.0.self_attn.v_proj"):
            expected = float_ref[name]
        elif "q_proj" in name:
            expected = alone[("q8_0", None)][name]
        else:
            expected = alone[("rtn", 2)][name]
        assert torch.equal(w, expected), name
    v0 = lm.model.get_submodule("model.layers.0.self_attn.v_proj")
    assert type(v0) is nn.Linear  # kept float, and said so
    assert any("model.layers.0.self_attn.v_proj" in n for n in report.notes)
    assert set(report.formats()) == {"rtn 2b", "rtn 4b", "Q8_0"}
    assert len(report.layers) == 2 * 7 - 1
    assert report.bpw == pytest.approx(report.bits / report.quantized_params)
    assert make_config("mixed", {"base": BASE, "rules": RULES}).bits == 2


def test_hessian_methods_in_rules_need_calibration() -> None:
    cfg = make_config("mixed", {"base": BASE, "rules": [{"match": "down", "method": "gptq", "bits": 4}]})
    lm = make_tiny_model()
    with pytest.raises(ConfigError, match="needs calibration Hessians"):
        quantize_model(lm.model, "mixed", cfg)


def test_mixed_checkpoint_reloads_bit_identically(tmp_path) -> None:
    lm = make_tiny_model(seed=2)
    report = quantize_model(lm.model, "mixed", _mixed())
    before, after = checkpoint_logits(lm, report, tmp_path / "ckpt")
    assert torch.equal(before, after)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"base": BASE, "rules": [{"method": "rtn", "bits": 4}]}, "needs 'match'"),
        ({"base": BASE, "rules": [{"match": "(", "method": "rtn"}]}, "bad 'match' pattern"),
        ({"base": {"method": "fp"}}, "base cannot be fp"),
        ({"base": {"bits": 2}}, "'method' key"),
        ({"base": BASE, "rules": [{"match": "q", "method": "mixed"}]}, "cannot be mixed"),
        ({"base": BASE, "rules": [{"match": "q", "method": "nope"}]}, "unknown method 'nope'"),
        ({"base": BASE, "rules": [{"match": "q", "method": "rtn", "bits": 11}]}, "bits must be"),
        ({"base": BASE, "rules": [{"match": "q", "method": "fp", "bits": 4}]}, "takes no options"),
        ({"base": BASE, "rules": {"match": "q"}}, "rules of method mixed must be list"),
        (
            {"base": {"method": "qtip", "finetune": {"stage1": {"epochs": 1}}}, "rules": []},
            "cannot fine-tune",
        ),
        ({"base": BASE, "bits": 4}, "bits follow the base"),
    ],
)
def test_bad_mixed_configs_are_clear_errors(options, message) -> None:
    with pytest.raises(ConfigError, match=message):
        make_config("mixed", options)


def test_a_study_cell_can_be_mixed(tiny_text_file) -> None:
    from q2lab.study.config import parse_study

    raw = {
        "name": "m",
        "models": ["tiny"],
        "methods": [{"method": "mixed", "base": BASE, "rules": [RULES[:1], RULES[1:]]}],
        "tasks": [f"ppl:{tiny_text_file}"],
    }
    cells = parse_study(raw).cells
    assert len(cells) == 2 and len({c.id for c in cells}) == 2  # a list of rule lists is a grid axis
    assert all(c.bits == 2 for c in cells)
