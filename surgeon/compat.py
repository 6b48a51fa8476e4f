"""The one place that knows transformers' moving names, and the check that no argument is dropped.

transformers 5.24 renamed the cache argument of every ``forward`` (and of ``generate``) from
``past_key_values`` to ``cache``, and the output field with it; older 5.x releases know only the
old name. Code elsewhere asks this module which name the installed model uses, so a rename
upstream changes one function here, not ten call sites.

``check_kwargs`` is how an entry point that takes ``**kwargs`` refuses the ones it does not
understand: by name, with the nearest valid name (STYLE.md, habit 9).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from surgeon.errors import UnknownArgumentError, did_you_mean

if TYPE_CHECKING:  # annotations only: the argument checks below are used by torch-free modules (config)
    from torch import nn

NEW_CACHE_NAME = "cache"  # transformers >= 5.24
OLD_CACHE_NAME = "past_key_values"  # transformers < 5.24 (accepted there with a deprecation warning after)


def forward_params(model: nn.Module) -> Mapping[str, inspect.Parameter]:
    """Parameters of ``type(model).forward`` (through transformers' deprecation wrappers)."""
    return inspect.signature(type(model).forward).parameters


def cache_name(model: nn.Module) -> str:
    """The keyword the model's ``forward`` takes its KV cache under: ``cache`` or ``past_key_values``."""
    params = forward_params(model)
    if NEW_CACHE_NAME in params:
        return NEW_CACHE_NAME
    if OLD_CACHE_NAME in params:
        return OLD_CACHE_NAME
    raise UnknownArgumentError(f"{type(model).__name__}.forward takes neither {NEW_CACHE_NAME!r} nor {OLD_CACHE_NAME!r}; "
                               "generation needs a decoder whose forward accepts a KV cache")


def output_cache(output: Any):
    """The cache a model output carries, under whichever field name the installed transformers uses."""
    return getattr(output, cache_field(type(output)))


def cache_field(output_class: type) -> str:
    """The field of a transformers output dataclass that holds the cache in the installed release."""
    names = {f.name for f in dataclasses.fields(output_class)}
    if NEW_CACHE_NAME in names:
        return NEW_CACHE_NAME
    if OLD_CACHE_NAME in names:
        return OLD_CACHE_NAME
    raise UnknownArgumentError(f"{output_class.__name__} has no {NEW_CACHE_NAME!r} or {OLD_CACHE_NAME!r} field; "
                               "this transformers release is outside the range surgeon supports (see pyproject.toml)")


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2's transposed linear, weight [in, out]), recognised by class name and field
    so that no stage imports it to ask."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def params_of(fn) -> tuple[str, ...]:
    """The named parameters of ``fn`` (what its ``**kwargs`` check accepts), without ``self``/``cls``."""
    return tuple(n for n, p in inspect.signature(fn).parameters.items()
                 if n not in ("self", "cls") and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))


def check_kwargs(where: str, kwargs: Mapping[str, Any], valid: Iterable[str], hint: str = "") -> None:
    """Raise ``UnknownArgumentError`` naming every key of ``kwargs`` not in ``valid`` (with the nearest names)."""
    valid = sorted(set(valid))
    unknown = [k for k in kwargs if k not in valid]
    if not unknown:
        return
    parts = [f"{k!r}{did_you_mean(k, valid)}" for k in unknown]
    noun = "argument" if len(unknown) == 1 else "arguments"
    raise UnknownArgumentError(f"{where}: unknown {noun} {', '.join(parts)}; it accepts {', '.join(valid) or 'none'}"
                               + (f"; {hint}" if hint else ""))


def refuse_value(where: str, name: str, value: Any, allowed: Iterable[Any], why: str) -> None:
    """A PEFT argument surgeon accepts by name but can honour only at some values: refuse the others."""
    allowed = tuple(allowed)
    if not any(value is a or (type(value) is type(a) and value == a) for a in allowed):
        raise UnknownArgumentError(f"{where}: {name}={value!r} is not supported ({why}); "
                                   f"use {' or '.join(repr(a) for a in allowed)}")


def refuse_peft_load_flags(where: str, autocast_adapter_dtype: bool, low_cpu_mem_usage: bool) -> None:
    """PEFT's loading flags, which surgeon honours only at their defaults."""
    refuse_value(where, "autocast_adapter_dtype", autocast_adapter_dtype, [True],
                 "adapters on fp16/bf16 bases are always kept in fp32")
    refuse_value(where, "low_cpu_mem_usage", low_cpu_mem_usage, [False],
                 "adapters are created on the base's device; they are small")


def forward_keywords(model: nn.Module) -> frozenset[str]:
    """Keywords the model's ``forward`` uses (cached per model class: ``forward`` is a hot path)."""
    return _forward_keywords(type(model))


@functools.lru_cache(maxsize=None)
def _forward_keywords(model_class: type) -> frozenset[str]:
    """Keywords the model's ``forward`` uses: its named parameters plus transformers' typed ``**kwargs``.

    transformers' forwards take ``**kwargs`` and ignore what they do not know; surgeon refuses those
    instead, so a misspelt ``attention_mask`` is an error rather than an unmasked forward.
    """
    params = inspect.signature(model_class.forward).parameters
    names = set(params_of(model_class.forward))
    if NEW_CACHE_NAME in names:
        names.add(OLD_CACHE_NAME)  # transformers still renames it (with its own deprecation warning)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        try:  # deferred: where transformers keeps this name moves between releases
            from transformers.utils.generic import TransformersKwargs

            names |= set(getattr(TransformersKwargs, "__annotations__", {}))
        except ImportError:
            pass
        names |= {"output_attentions", "output_hidden_states", "return_dict"}
    return frozenset(names)
