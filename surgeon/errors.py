"""One error tree for everything surgeon refuses.

Every error subclasses ``SurgeonError`` and also the builtin it stands in for, so
``except ValueError`` in user code keeps working. Messages name the thing at fault
(module path, file, field) and, where there is one, the fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SurgeonError(Exception):
    """Root of every error surgeon raises on purpose.

    ``exit_code`` is the CLI's contract: 2 for input or usage refused before any work (the default), 1 for work
    that ran and failed (a check, a write cut short, training that diverged).
    """

    exit_code = 2


class SurgeonNotice(UserWarning):
    """Something surgeon did on the user's behalf that they should hear about (the CLI prints it as a note)."""


class OutputError(SurgeonError, FileExistsError):
    """OUT exists already, cannot be written, or would destroy an input."""


class WriteError(SurgeonError, OSError):
    """Writing OUT failed part-way (disk full, file size limit); nothing was left behind."""

    exit_code = 1


class ConfigError(SurgeonError, ValueError):
    """A configuration field has a value surgeon cannot use."""


class TargetNotFoundError(SurgeonError, ValueError):
    """A name in ``target_modules`` (or a related field) matched no module."""


class UnsupportedModuleError(SurgeonError, TypeError):
    """A module was targeted whose type LoRA cannot wrap."""


class CaptureError(SurgeonError, RuntimeError):
    """``torch.export`` could not capture the model."""


class AdapterError(SurgeonError, ValueError):
    """An adapter (name, directory or file) is missing, malformed or mismatched."""


class AdapterFileError(AdapterError, OSError):
    """An adapter file is absent, unreadable or corrupt."""


class ModelNotFoundError(SurgeonError, FileNotFoundError):
    """A model argument names neither a local directory nor a built-in model."""


class DataError(SurgeonError, ValueError):
    """Training data is missing or too small to use."""


class TrainingDiverged(SurgeonError, ArithmeticError):
    """The loss became NaN or infinite while training."""

    exit_code = 1


class ModelFileError(ModelNotFoundError):
    """A model directory is there but a file in it (config.json, weights) is unreadable or not a model's."""


class FoldError(SurgeonError, FloatingPointError):
    """Folding an adapter into a weight produced NaN or Inf (the adapter is bad input: exit 2)."""


class GenerationError(SurgeonError):
    """The model or the call cannot be served by the decode graph."""


class QuantizationError(SurgeonError):
    """A quantized model or setting surgeon does not support."""


class GenerationArgumentError(SurgeonError, ValueError):
    """A generation argument (sampling setting, token id, prompt) that cannot be honoured."""


class ExportFileError(SurgeonError, ValueError):
    """An export directory's manifest or files are malformed or point outside the export."""


class UnknownArgumentError(SurgeonError, TypeError):
    """A keyword argument that no part of surgeon (or what it calls) would use."""


def suggest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The nearest names to ``name`` among ``choices``, best first.

    Compares both whole names and their last dotted component, so ``q_attn`` finds
    ``transformer.h.0.attn.c_attn`` through ``c_attn``.
    """
    choices = sorted(set(choices))
    if not choices:
        return []
    leaves = {}
    for choice in choices:
        leaves.setdefault(choice.rsplit(".", 1)[-1], choice)
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.6)
    leaf = name.rsplit(".", 1)[-1]
    close_leaves = difflib.get_close_matches(leaf, list(leaves), n=n, cutoff=0.5)
    picked = list(dict.fromkeys(close + close_leaves))
    return picked[:n]


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'a' or 'b'?)`` or an empty string."""
    near = suggest(name, choices)
    if not near:
        return ""
    return " (did you mean " + " or ".join(repr(x) for x in near) + "?)"
