"""QuIP# on the real model: with the same shared Hessians, 2-bit QuIP# (≈ 2.0 bpw) has a lower
KLD to the float model than GPTQ 2-bit g128 (≈ 2.3 bpw).  To fit the test budget only the
first four decoder blocks are quantized (the full-model numbers are in
``benchmarks/quip_smollm2.py`` and the README)."""

from __future__ import annotations

import pytest

from q2lab.calib.store import CalibSpec, calibrate
from q2lab.eval.tasks import Evaluator, parse_task
from q2lab.models import load_model
from q2lab.quant import make_config
from q2lab.quant.model import quantize_model
from q2lab.quant.quip import QuipLinear

pytestmark = pytest.mark.integration

SKIP = [r"layers\.([4-9]|[1-9][0-9])\."]  # keep blocks 4.. in float


def test_quip_2bit_has_lower_kld_than_gptq_2bit_g128(smollm2, tmp_path):
    # the calibration of examples/quickstart.yaml: computed once per machine, then reused
    store = calibrate(smollm2, CalibSpec("wikitext2", windows=32, ctx=512, seed=0))
    evaluator = Evaluator(smollm2, workdir=tmp_path)
    tasks = [parse_task(t, windows=2, ctx=512) for t in ("ppl:wikitext2", "kld:wikitext2")]
    got = {}
    for method, opts in (("quip#", {"bits": 2}), ("gptq", {"bits": 2, "group_size": 128})):
        cand = load_model("smollm2-135m")
        report = quantize_model(cand.model, method, make_config(method, opts), store, skip=SKIP)
        assert len(report.layers) == 4 * 7
        if method == "quip#":
            assert sum(isinstance(m, QuipLinear) for m in cand.model.modules()) == 28
            assert report.bpw == pytest.approx(2 + (576 + 576 + 32) / (576 * 576), abs=0.003)
        got[method] = {r.metric: r.value for r in evaluator.run(cand, tasks)}
        del cand
    assert got["quip#"]["kld_mean"] < got["gptq"]["kld_mean"], got
