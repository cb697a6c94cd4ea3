"""Same seed, same settings → the same result, whatever the number of intra-op threads.

torch's matrix products give the same bits at any thread count (MKL), but LAPACK factorizations
and full reductions do not, and a quantizer turns one flipped last bit into a different rounding
decision and every later column after it.  q2lab runs those operations on one thread
(``q2lab.utils.threads.one_thread``), so a quantized model is bit-identical at 1 and 2 threads.
Shapes are chosen large enough (256 × 1024 weights, 1024-wide Hessians) for torch and MKL to
split the work across threads at all; without the guard, GPTQ, QuIP# and QTIP all differ here.
"""

from __future__ import annotations

import pytest
import torch

from q2lab.calib.hessian import HessianAccumulator
from q2lab.quant import make_config
from q2lab.quant.base import get_quantizer
from q2lab.utils.threads import one_thread

METHODS = [
    ("gptq", {"bits": 2, "group_size": 128}),
    ("quip#", {"bits": 2}),
    ("qtip", {"bits": 2}),
    ("rtn", {"bits": 3, "group_size": 64, "clip": "mse"}),
]


def _problem(seed: int = 0):
    """Activations like a real LLM's: correlated columns and a few massive ones (×300), which make
    the Hessian ill-conditioned — where last-bit differences turn into different rounding (on
    well-conditioned random Hessians the unguarded code happens to agree)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(256, 1024, generator=g)
    scale = torch.ones(1024)
    scale[[3, 77, 500]] = 300.0
    x = torch.randn(4096, 64, generator=g) @ torch.randn(64, 1024, generator=g) * 0.3
    x = (x + 0.05 * torch.randn(4096, 1024, generator=g)) * scale
    acc = HessianAccumulator(1024)
    acc.add(x)
    return w, acc.result()


def _stored(method: str, opts: dict, threads: int) -> dict[str, torch.Tensor]:
    w, h = _problem()
    cfg = make_config(method, opts)
    q = get_quantizer(method)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        qt = q.quantize(w, h if q.uses_hessian(cfg) else None, cfg)
    finally:
        torch.set_num_threads(before)
    return qt.tensors


@pytest.mark.parametrize("method,opts", METHODS, ids=[m for m, _ in METHODS])
def test_quantized_bits_do_not_depend_on_the_thread_count(method, opts) -> None:
    one, two = _stored(method, opts, 1), _stored(method, opts, 2)
    assert one.keys() == two.keys()
    assert [k for k in one if not torch.equal(one[k], two[k])] == []
    again = _stored(method, opts, 2)  # and the same run twice is the same
    assert all(torch.equal(two[k], again[k]) for k in two)


def test_the_operations_it_guards_do_depend_on_threads() -> None:
    """Why the guard exists (and that this test file can fail): unguarded, a Cholesky factor and a
    full sum differ between 1 and 2 threads on these shapes."""
    _, h = _problem()
    hm = h.mean(torch.float64) + 0.01 * torch.eye(1024, dtype=torch.float64)
    big = torch.randn(4096, 1024, generator=torch.Generator().manual_seed(3))
    before = torch.get_num_threads()
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append((torch.linalg.cholesky(hm), big.square().mean()))
    torch.set_num_threads(before)
    (c1, s1), (c2, s2) = results
    assert not (torch.equal(c1, c2) and torch.equal(s1, s2))


def test_one_thread_restores_the_setting() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), one_thread():
            raise RuntimeError
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_provenance_names_the_commit_and_a_modified_checkout(tmp_path) -> None:
    """A record's ``q2lab_commit`` reproduces it only with the commit's own files: a checkout with
    modified tracked files says so (``q2lab_dirty``)."""
    import os
    import shutil
    import subprocess

    from q2lab.utils.provenance import git_state

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    assert git_state(tmp_path) == (None, False)

    def git(*args: str) -> str:
        env = {
            **os.environ,
            "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@t",
        }
        run = subprocess.run(
            ["git", "-C", str(tmp_path), *args], capture_output=True, text=True, env=env, check=True
        )
        return run.stdout.strip()

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-qm", "one")
    head = git("rev-parse", "HEAD")
    assert git_state(tmp_path) == (head, False)
    (tmp_path / "b.py").write_text("untracked\n")  # untracked files do not change the code that ran
    assert git_state(tmp_path) == (head, False)
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_state(tmp_path) == (head, True)
