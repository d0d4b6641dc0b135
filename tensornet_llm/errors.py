"""The exceptions tensornet-llm raises on purpose: bad input, not bugs.

Every error the library raises about what it was given derives from :class:`TensornetError`,
and each also derives from the built-in exception a caller would expect (``ValueError`` for a
bad argument, ``FileExistsError`` for an output that is in the way, ...), so existing ``except``
clauses keep working. The command line prints these as one line and exits with status 2; any
other exception is a bug and shows its traceback.

This module imports nothing from the package: every room may raise these.
"""

from __future__ import annotations

__all__ = [
    "TensornetError", "ArgumentError", "ArgumentTypeError", "InputFileError",
    "OutputExistsError", "OutputNotWritableError", "CheckpointError", "MissingDependencyError",
    "NonFiniteActivationError", "RankDeficientError", "EstimateFallbackWarning",
    "HealingCheckWarning", "first_line",
]


class TensornetError(Exception):
    """Base class: the library refused its input (the message says which argument or file)."""


class ArgumentError(TensornetError, ValueError):
    """An argument has a value the library cannot use."""


class ArgumentTypeError(TensornetError, TypeError):
    """An argument has a type the library cannot use (or an unknown keyword was given)."""


class InputFileError(TensornetError, FileNotFoundError):
    """A file or directory the library was asked to read does not exist or cannot be used."""


class OutputExistsError(TensornetError, FileExistsError):
    """The output path exists and is not a previous output of this library (pass
    ``overwrite=True``, or ``--overwrite`` on the command line, to replace it)."""


class OutputNotWritableError(TensornetError, PermissionError):
    """The output path cannot be created or written."""


class CheckpointError(TensornetError, ValueError):
    """A saved model directory is incomplete, corrupted or does not match its description."""


class NonFiniteActivationError(ArgumentError):
    """Calibration text drove the model to NaN or Inf activations (a model that overflows in
    float16, say), so nothing can be fitted to them; the message names the first module."""


class RankDeficientError(ArgumentError):
    """A matrix that must have full column rank (the rows kept rows are chosen from) has less:
    no set of its rows is invertible."""


class MissingDependencyError(TensornetError, ImportError):
    """An optional package or the bundled model is not installed."""


class EstimateFallbackWarning(UserWarning):
    """The library measured something a weaker way than asked (the budget's damage from the
    output error because the model has no loss to differentiate, say). The reason is in the
    message, and ``compactify`` also records it in its report."""


class HealingCheckWarning(UserWarning):
    """Perplexity on the check text rose during healing (``heal(..., check=...,
    on_rise="warn")``): training on the healing text is costing quality elsewhere."""


def first_line(exc: BaseException) -> str:
    """``"KindOfError: the first line of its message"``: another library's error, as the one-line
    reason inside one of ours."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
