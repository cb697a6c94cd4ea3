"""Fine-tuning of quantized models' continuous parameters (docs/DESIGN.md, "Fine-tuning").

Stage 1 tunes each block after its linears are rounded; stage 2 (both in :mod:`.stages`)
tunes the whole model against the float model's cached log-probs.  Both use the relaxation of
:mod:`.relax`; the options are :class:`q2lab.quant.finetune_option.FinetuneConfig` (a method's
``finetune:`` section).  Methods do not import this package: :func:`finetuner` hands the stages
to :func:`q2lab.quant.model.quantize_model` as its ``tuner`` hook.
"""

from __future__ import annotations

from typing import Any


def finetune_windows(loaded: Any, store: Any, cfg: Any) -> Any:
    """Token windows for fine-tuning ``loaded`` with method config ``cfg``: ``finetune.windows``
    windows drawn like the store's calibration windows (same corpus, random mode, seed and —
    unless ``finetune.ctx`` says otherwise — ctx); None when fine-tuning is off."""
    from q2lab.calib.store import calibration_windows
    from q2lab.errors import ConfigError
    from q2lab.quant.finetune_option import finetune_of

    ft = finetune_of(cfg)
    if ft is None:
        return None
    if store is None:
        raise ConfigError("fine-tuning needs a calibration (its windows come from the calibration corpus)")
    return calibration_windows(loaded, store, ft.windows, ft.ctx or None)


def finetuner(loaded: Any, store: Any, cfg: Any, teacher_data: Any = None, workdir: Any = None) -> Any:
    """The ``tuner`` of :func:`q2lab.quant.model.quantize_model` for method config ``cfg``: the
    windows are drawn now (:func:`finetune_windows`), the stages start when ``quantize_model``
    calls it with the model, before any block is rounded.  None when fine-tuning is off.

    For UPQ's ``qat:`` section (:mod:`.qat`): ``teacher_data()`` returns the teacher-written
    :class:`~q2lab.finetune.qat.DistillSet` when ``qat.data`` is ``self`` (generation lives in
    ``eval``, above this package: :func:`q2lab.eval.distill.teacher_data` builds it, and the study
    runner and ``q2lab.api`` pass it in); ``workdir`` holds the resumable training state, kept
    after the run (default: the q2lab cache, keyed by model, options and data, and deleted once the
    run ends)."""
    from q2lab.quant.finetune_option import finetune_of, qat_of

    qat = qat_of(cfg)
    if qat is not None:
        return _qat_tuner(loaded, store, cfg, qat, teacher_data, workdir)
    windows = finetune_windows(loaded, store, cfg)
    if windows is None:
        return None
    ft = finetune_of(cfg)

    def start(model: Any) -> Any:
        from q2lab.finetune.stages import FinetuneRun

        return FinetuneRun(model, ft, windows)

    return start


def _qat_tuner(loaded: Any, store: Any, cfg: Any, qat: Any, teacher_data: Any, workdir: Any) -> Any:
    from q2lab.errors import ConfigError

    if qat.data == "self" and teacher_data is None:
        raise ConfigError(
            "UPQ with qat.data 'self' needs the teacher's answers: pass "
            "teacher_data=q2lab.eval.distill.teacher_data(loaded, qat) (the study runner and q2lab.api do)"
        )
    if qat.data == "text" and store is None:
        raise ConfigError(
            "UPQ with qat.data 'text' needs a calibration (its windows come from the calibration corpus)"
        )

    def start(model: Any) -> Any:
        from pathlib import Path

        from q2lab.calib.store import calibration_windows
        from q2lab.finetune.qat import DistillSet, QATRun, qat_key
        from q2lab.utils.io import cache_dir

        if qat.data == "self":
            data = teacher_data()
        else:
            windows = calibration_windows(loaded, store, qat.sequences, qat.ctx)
            data = DistillSet.from_windows(
                windows, {"kind": "text", "corpus": store.describe().get("corpus")}
            )
        key = qat_key(loaded.info.fingerprint, cfg, data, store.key if store is not None else "")
        folder = Path(workdir) if workdir else cache_dir() / "qat" / key
        return QATRun(model, cfg, qat, data, folder, key, keep_state=bool(workdir))

    return start
