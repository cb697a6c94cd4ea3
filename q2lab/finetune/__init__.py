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


def finetuner(loaded: Any, store: Any, cfg: Any) -> Any:
    """The ``tuner`` of :func:`q2lab.quant.model.quantize_model` for method config ``cfg``: the
    windows are drawn now (:func:`finetune_windows`), the stages start when ``quantize_model``
    calls it with the model, before any block is rounded.  None when fine-tuning is off."""
    from q2lab.quant.finetune_option import finetune_of

    windows = finetune_windows(loaded, store, cfg)
    if windows is None:
        return None
    ft = finetune_of(cfg)

    def start(model: Any) -> Any:
        from q2lab.finetune.stages import FinetuneRun

        return FinetuneRun(model, ft, windows)

    return start
