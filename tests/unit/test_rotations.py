"""Whole-model rotations: the rotated float model is the same function, its Hessians derive from
the original's, and QuaRot (rotations + GPTQ) runs on them."""

from __future__ import annotations

import pytest
import torch

from q2lab.calib.capture import stream_hessians
from q2lab.calib.derived import DerivedHessians, derive
from q2lab.calib.hessian import Hessian
from q2lab.errors import ModelError, ShapeError
from q2lab.models.arch import find_decoder
from q2lab.quant.base import make_config
from q2lab.quant.model import quantize_model
from q2lab.transforms import rotate
from q2lab.transforms.hadamard import UnsupportedSizeError
from tests.tiny import make_tiny_model

ARCHS = [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("qwen2", {}),  # q/k/v biases
    ("gemma3", {"tie_word_embeddings": True}),  # (1 + w) norms, sandwich norms, q/k norms
    ("phi3", {"pad_token_id": 1}),  # fused qkv_proj (R2 on its value rows) and gate_up_proj
    ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),  # router + experts
    ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2, "head_dim": 16, "moe_intermediate_size": 48}),
]
FIRST_READER = {"phi3": "self_attn.qkv_proj"}


def _ids(seed: int = 0, n: int = 2, ctx: int = 24) -> torch.Tensor:
    return torch.randint(2, 290, (n, ctx), generator=torch.Generator().manual_seed(seed))


def _perturb_norms(model: torch.nn.Module, seed: int = 1) -> None:
    """Random models start with γ = 1 (or w = 0): give the norms real scales to fuse."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.add_(0.5 * torch.randn(p.shape, generator=g))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.double()


@pytest.mark.parametrize(("arch", "over"), ARCHS, ids=lambda v: str(v))
@pytest.mark.parametrize("kind", ["hadamard", "orthogonal"])
def test_rotated_float_model_gives_the_same_logits(arch, over, kind):
    lm = make_tiny_model(arch, seed=5, **over)
    _perturb_norms(lm.model)
    ids = _ids()
    before = _logits(lm.model, ids)
    d = lm.model.config.hidden_size
    hd = lm.model.config.get_text_config().head_dim if arch == "gemma3" else 16
    make = rotate.random_hadamard if kind == "hadamard" else rotate.random_orthogonal
    q = find_decoder(lm.model).block_linears(0)[FIRST_READER.get(arch, "self_attn.q_proj")]
    q_before = q.weight.detach().clone()
    done = rotate.rotate_model(lm.model, make(d, 1), make(hd, 2))
    after = _logits(lm.model, ids)
    assert float((after - before).abs().max()) <= 1e-4 * max(1.0, float(before.abs().max()))
    # The rotation did something: q_proj's weight is not the one it was.
    assert float((q.weight.detach() - q_before).abs().max()) > 0.1 * float(q_before.abs().max())
    if over.get("tie_word_embeddings"):
        assert done.untied
        assert lm.model.get_output_embeddings().weight is not lm.model.get_input_embeddings().weight
    if arch == "gemma3":
        assert len(done.dense_norms) == 2 * lm.model.config.num_hidden_layers
    if arch in ("mixtral", "qwen3_moe"):  # every expert's gate/up read the rotated stream
        experts = {n for n in done.input_maps if ".experts." in n}
        assert len(experts) == 2 * 4 * lm.model.config.num_hidden_layers


def _hessians(model, ids) -> dict[str, Hessian]:
    layout = find_decoder(model)
    out: dict[str, Hessian] = {}

    def on_block(b, hessians, groups):
        for lin, leader in groups.items():
            out[layout.full_name(b, lin)] = hessians[leader]

    stream_hessians(model, ids, on_block)
    return out


class _Store:
    """The two things DerivedHessians reads from a HessianStore, over in-memory Hessians."""

    def __init__(self, hessians: dict[str, Hessian]) -> None:
        self._h = hessians
        self.linears = {k: {"block": int(k.split(".")[2]), "tensor": k} for k in hessians}

    def hessian(self, name: str) -> Hessian:
        return self._h[name]


@pytest.mark.parametrize("arch", ["llama", "gemma3", "phi3", "mixtral"])
def test_derived_hessian_equals_the_one_captured_on_the_rotated_model(arch):
    over = dict(next(o for a, o in ARCHS if a == arch)) if arch in ("phi3", "mixtral") else {}
    lm = make_tiny_model(arch, seed=7, **over)
    _perturb_norms(lm.model)
    ids = _ids(3, n=3, ctx=32)
    original = _hessians(lm.model, ids)
    d = lm.model.config.hidden_size
    done = rotate.rotate_model(lm.model, rotate.random_orthogonal(d, 4), rotate.random_orthogonal(16, 5))
    captured = _hessians(lm.model, ids)
    derived = DerivedHessians(_Store(original), done.input_maps)
    expected = {
        "phi3": {"qkv_proj", "gate_up_proj", "o_proj"},
        "mixtral": {"q_proj", "k_proj", "v_proj", "gate", "gate_proj", "up_proj", "o_proj"},
    }.get(arch, {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj"})
    assert {n.rsplit(".", 1)[-1] for n in done.input_maps} == expected
    assert captured  # per expert in a mixture: each expert's own tokens
    for name, h in captured.items():
        want = h.xtx
        got = derived.hessian(name).xtx
        rel = float((got - want).abs().max() / want.abs().max())
        assert rel < 1e-5, (name, rel)
        if name in done.input_maps:  # and the map mattered: the original differs
            assert float((original[name].xtx - want).abs().max() / want.abs().max()) > 1e-2


def test_derive_rejects_a_map_of_the_wrong_width():
    with pytest.raises(ShapeError, match="does not fit a 4-wide Hessian"):
        derive(Hessian(torch.eye(4, dtype=torch.float64), 1), torch.eye(3))


def test_a_width_with_no_hadamard_is_one_clear_error():
    # 92 = 23·4: its only Hadamard matrices come from constructions q2lab does not build.
    lm = make_tiny_model("llama", hidden_size=92, head_dim=16)
    cfg = make_config("quarot", {"bits": 4})
    with pytest.raises(UnsupportedSizeError, match="no Hadamard transform of size 92"):
        quantize_model(lm.model, "quarot", cfg, _Store({}))
    # A Haar rotation has no size constraint.
    before = _logits(lm.model, _ids())
    rotate.rotate_model(lm.model, rotate.random_orthogonal(92, 0), rotate.random_orthogonal(16, 1))
    assert float((_logits(lm.model, _ids()) - before).abs().max()) < 1e-4


def test_an_architecture_whose_norms_cannot_be_fused_is_one_clear_error():
    lm = make_tiny_model("gpt_neox")  # LayerNorm with a bias: no diagonal scale to fuse
    with pytest.raises(
        ModelError, match=r"rotations cannot fuse the norms of model type 'gpt_neox': supported are .*phi3"
    ):
        rotate.rotate_model(lm.model, torch.eye(64), None)


def test_a_plan_whose_module_is_missing_is_one_clear_error():
    lm = make_tiny_model("llama")
    plan = rotate.NormPlan(
        "input_layernorm", "post_attention_layernorm", None, None, 0.0, mlp_readers=("mlp.w1",)
    )
    with pytest.raises(ModelError, match=r"rotations expect a module 'mlp\.w1' in each decoder block"):
        plan.roles(find_decoder(lm.model).layers[0])


def test_rotations_must_be_orthogonal_and_sized():
    lm = make_tiny_model("llama")
    with pytest.raises(ShapeError, match="R1 must be 64 × 64"):
        rotate.rotate_model(lm.model, torch.eye(32), None)
    with pytest.raises(ShapeError, match="R1 is not orthogonal"):
        rotate.rotate_model(make_tiny_model("llama").model, 2 * torch.eye(64), None)


def test_a_norm_channel_of_scale_zero_gets_a_stand_in_second_moment():
    """Gemma-3-270M zeroes one channel of most pre-FFN norms: the store never sees it, the rotated
    input does.  Off that direction the derived Hessian is exact; along it, it is what RMS
    normalization implies (each token's squared norm is the width), which is the truth here
    because only one channel is unseen."""
    lm = make_tiny_model("gemma3", seed=2)
    _perturb_norms(lm.model)
    with torch.no_grad():
        lm.model.model.layers[0].pre_feedforward_layernorm.weight[5] = -1.0  # γ = 1 + w = 0
    ids = _ids(4, n=2, ctx=32)
    original = _hessians(lm.model, ids)
    r1 = rotate.random_orthogonal(64, 8)
    done = rotate.rotate_model(lm.model, r1, None)
    assert done.dead_channels == 1 and any("scale 0" in n for n in done.notes())
    name = "model.layers.0.mlp.gate_proj"
    got = DerivedHessians(_Store(original), done.input_maps).hessian(name).xtx
    want = _hessians(lm.model, ids)[name].xtx
    u = r1[5:6]  # the unseen direction in the rotated basis
    p = torch.eye(64, dtype=torch.float64) - u.T @ u
    assert float((p @ (got - want) @ p).abs().max() / want.abs().max()) < 1e-5
    assert float(u @ got @ u.T) == pytest.approx(float(u @ want @ u.T), rel=1e-3)
    assert float(torch.trace(got)) == pytest.approx(64 * 2 * 32, rel=1e-3)  # n tokens × width
    assert torch.linalg.eigvalsh(got).min() > 0


# --------------------------------------------------------------------------- QuaRot and SpinQuant
def test_cayley_steps_stay_orthogonal_and_descend():
    """Minimize ‖X − T‖² over rotations: the optimum is T itself (orthogonal)."""
    t = rotate.random_orthogonal(16, 1)
    x = rotate.random_orthogonal(16, 2)
    m = torch.zeros(16, 16, dtype=torch.float64)
    losses = []
    for _ in range(60):
        losses.append(float(((x - t) ** 2).sum()))
        x = rotate.cayley_step(x, 2 * (x - t), 0.2, m, 0.5)
        assert float((x.T @ x - torch.eye(16, dtype=torch.float64)).abs().max()) < 1e-10
    assert losses[-1] < 0.05 * losses[0]
    # First order: a tiny step is X − lr·(G − X Gᵀ X).
    g = torch.randn(16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    lr = 1e-6
    want = x - lr * (g - x @ g.T @ x)
    assert float((rotate.cayley_step(x, g, lr) - want).abs().max()) < 1e-10


def test_a_capped_cayley_step_turns_no_plane_further_than_max_angle():
    x = rotate.random_orthogonal(12, 4)
    g = 1e3 * torch.randn(12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    turn = rotate.cayley_step(x, g, 1.5, max_angle=0.02) @ x.T  # the rotation the step applied
    angles = torch.linalg.eigvals(turn).angle().abs()
    assert float(angles.max()) == pytest.approx(0.02, rel=1e-6)
    assert float(torch.linalg.eigvals(rotate.cayley_step(x, g, 1.5) @ x.T).angle().abs().max()) > 1.0


def test_fake_quant_is_rtn_forward_and_identity_backward():
    from q2lab.quant import uniform

    w = torch.randn(8, 96, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out = uniform.fake_quant(w, 2, 64)
    for s, e in ((0, 64), (64, 96)):  # a short last group, like 576 columns in groups of 128
        scale, zero = uniform.grid_params(w[:, s:e].detach(), 2, False)
        want = uniform.from_grid(uniform.round_to_grid(w[:, s:e].detach(), scale, zero, 2), scale, zero)
        assert torch.equal(out[:, s:e].detach(), want)
        assert len(torch.unique(out[0, s:e].detach())) <= 4
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def _windows(n: int = 6, ctx: int = 24):
    return lambda k=None, c=None: _ids(11, n=k or n, ctx=c or ctx)


def test_spinquant_learns_rotations_that_lower_the_quantized_loss():
    from q2lab.quant.spinquant import SpinQuantConfig, learn_rotations

    lm = make_tiny_model("llama", seed=3)
    _perturb_norms(lm.model)
    cfg = SpinQuantConfig(bits=2, group_size=32, steps=30, lr=0.5, max_angle=0.2)
    r1, r2 = rotate.random_hadamard(64, 0), rotate.random_hadamard(16, 1)
    ids = _windows(2)()
    before = _logits(lm.model, ids)
    l1, l2, stats = learn_rotations(lm.model, r1, r2, ids, cfg)
    assert stats["loss_last"] < stats["loss_first"] - 0.05, stats
    assert float((l1.T @ l1 - torch.eye(64, dtype=torch.float64)).abs().max()) < 1e-10
    assert float((l1 - r1).abs().max()) > 1e-3 and len(l2) == 2
    assert float((l2[0] - l2[1]).abs().max()) > 1e-4  # one R2 per block, learned apart
    assert torch.equal(_logits(lm.model, ids), before)  # learning leaves the float model alone


@pytest.mark.parametrize("method", ["quarot", "spinquant"])
def test_rotation_methods_run_end_to_end_and_keep_the_float_function_at_8_bits(method):
    lm = make_tiny_model("gemma3", seed=4, tie_word_embeddings=True)
    _perturb_norms(lm.model)
    ids = _ids(12, n=4, ctx=32)
    before = _logits(lm.model, ids)
    store = _Store(_hessians(lm.model, ids))
    opts = {"bits": 8, "group_size": 32} | ({"steps": 3, "windows": 2} if method == "spinquant" else {})
    report = quantize_model(lm.model, method, make_config(method, opts), store, windows=_windows())
    assert report.bpw < 9 and any("R1" in n for n in report.notes)
    p, q = torch.log_softmax(before, -1), torch.log_softmax(_logits(lm.model, ids), -1)
    assert float((p.exp() * (p - q)).sum(-1).mean()) < 1e-3


def test_spinquant_without_windows_is_one_clear_error():
    from q2lab.errors import ConfigError

    lm = make_tiny_model("llama")
    with pytest.raises(ConfigError, match="learns its rotations on calibration windows"):
        quantize_model(lm.model, "spinquant", make_config("spinquant", {"bits": 2}), _Store({}))


def test_a_rotation_method_cannot_be_part_of_a_mix():
    from q2lab.errors import ConfigError

    with pytest.raises(ConfigError, match="quarot, which transforms the whole model"):
        rules = [{"match": "q_proj", "method": "quarot"}]
        make_config("mixed", {"base": {"method": "gptq", "bits": 2}, "rules": rules})
    with pytest.raises(ConfigError, match="spinquant, which transforms the whole model"):
        make_config("mixed", {"base": {"method": "spinquant", "bits": 2}})


def _massive_channel_model(channel: int = 5):
    """A tiny Gemma-3 whose pre-FFN norms zero one channel that carries a massive activation, as
    Gemma-3-270M's do."""
    lm = make_tiny_model("gemma3", seed=8, tie_word_embeddings=True)
    _perturb_norms(lm.model)
    with torch.no_grad():
        for block in find_decoder(lm.model).layers:
            block.pre_feedforward_layernorm.weight[channel] = -1.0  # γ = 1 + w = 0
        lm.model.get_input_embeddings().weight[:, channel] *= 300.0
    return lm


@pytest.mark.parametrize("fix", [True, False])
def test_quarot_keeps_zero_scale_channels_out_of_r1(fix):
    """With the channel fixed, every MLP reader's quantized weight is exactly 0 on it (the norm
    annihilates it, and so does the rounded layer); mixed into R1, rounding breaks the
    cancellation and the massive channel leaks into the MLP."""
    lm = _massive_channel_model()
    assert rotate.zero_scale_channels(lm.model).tolist() == [5]
    ids = _ids(12, n=4, ctx=32)
    store = _Store(_hessians(lm.model, ids))
    cfg = make_config("quarot", {"bits": 2, "group_size": 32, "fix_zero_scale": fix})
    layers = find_decoder(lm.model).layers
    report = quantize_model(lm.model, "quarot", cfg, store)
    assert any("1 zero-scale residual channel(s) [5] unrotated (Haar" in n for n in report.notes) == fix
    for block in layers:
        col = block.mlp.gate_proj.weight_dequantized(torch.float32)[:, 5]
        assert (float(col.abs().max()) == 0.0) == fix


def test_the_fix_option_leaves_earlier_cell_ids_alone():
    """``fix_zero_scale`` joined QuaRot after records existed: at its default the config dict
    (which cell ids hash) is the one those records have."""
    assert "fix_zero_scale" not in make_config("quarot", {"bits": 2}).to_dict()
    assert "fix_zero_scale" not in make_config("quarot", {"bits": 2, "fix_zero_scale": False}).to_dict()
    assert make_config("quarot", {"bits": 2, "fix_zero_scale": True}).to_dict()["fix_zero_scale"] is True


def test_spinquant_learning_leaves_fixed_channels_unrotated():
    from q2lab.quant.spinquant import SpinQuantConfig, learn_rotations

    lm = make_tiny_model("llama", seed=3)
    _perturb_norms(lm.model)
    cfg = SpinQuantConfig(bits=2, group_size=32, steps=5, lr=0.5, max_angle=0.2)
    fixed = torch.tensor([2, 40])
    r1 = rotate.fix_channels(rotate.random_orthogonal(62, 0), fixed, 64)
    l1, _, _ = learn_rotations(lm.model, r1, None, _windows(2)(), cfg, fixed)
    eye = torch.eye(64, dtype=torch.float64)
    assert float((l1[fixed] - eye[fixed]).abs().max()) < 1e-12
    assert float((l1[:, fixed] - eye[:, fixed]).abs().max()) < 1e-12
    assert float((l1 - r1).abs().max()) > 1e-3  # the rest did learn


def test_identity_rotation_only_fuses_the_norms():
    """The ablation ``rotation: identity``: readers become W·diag(γ), writers are unchanged."""
    from q2lab.quant.base import get_quantizer

    lm = make_tiny_model("llama", seed=6)
    _perturb_norms(lm.model)
    block = find_decoder(lm.model).layers[0]
    q, o = block.self_attn.q_proj.weight.detach().clone(), block.self_attn.o_proj.weight.detach().clone()
    gamma = block.input_layernorm.weight.detach().clone()
    cfg = make_config("quarot", {"bits": 2, "rotation": "identity"})
    get_quantizer("quarot").prepare_model(lm.model, cfg, _Store({}))
    assert torch.allclose(block.self_attn.q_proj.weight, q * gamma[None, :], atol=1e-6)
    assert torch.allclose(block.self_attn.o_proj.weight, o, atol=1e-6)
