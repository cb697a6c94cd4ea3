"""User-facing errors.

Everything a user can get wrong (a path, a method name, a bit-width, a corrupt file) raises a
subclass of :class:`Q2labError` with one sentence that names the problem.  The CLI prints that
sentence and exits with status 2 instead of showing a traceback from deep inside torch.
"""

from __future__ import annotations


class Q2labError(Exception):
    """Base class for errors caused by user input, shown to the user as one line."""


class ConfigError(Q2labError, ValueError):
    """An option, method config or study YAML value is invalid."""


class DataError(Q2labError, FileNotFoundError):
    """A corpus, task file or data folder is missing or malformed."""


class ModelError(Q2labError):
    """A model cannot be found, fetched, loaded or understood."""


class CorruptFileError(Q2labError):
    """A checkpoint, GGUF or Hessian store exists but cannot be read."""


class ShapeError(Q2labError, ValueError):
    """Tensor shapes do not fit together (e.g. a Hessian for another layer)."""


class CalibrationLanguageWarning(UserWarning):
    """A model calibrated on one language is scored on text in another."""
