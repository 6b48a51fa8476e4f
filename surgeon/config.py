"""``LoraConfig`` and ``TaskType``: frozen, validated at construction, PEFT JSON at the edges.

Field names and defaults are PEFT's, so code written for ``peft.LoraConfig`` runs unchanged.
Sequences given as lists or sets are stored as tuples (sets sorted) so a config is immutable;
that is the only normalisation, and it changes no meaning.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
import warnings
from collections.abc import Mapping
from typing import Any

from surgeon.compat import check_kwargs
from surgeon.errors import ConfigError, did_you_mean


class TaskType(str, enum.Enum):
    """What the base model computes; decides the head, the loss and the capture inputs."""

    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"
    TOKEN_CLS = "TOKEN_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"
    QUESTION_ANS = "QUESTION_ANS"

    def __str__(self) -> str:
        return self.value


# Modules PEFT's classifier tasks make trainable unless told otherwise (the new head).
CLASSIFIER_HEADS = ("classifier", "score")

# PEFT fields we accept only at their default value: (field, default).
_UNSUPPORTED_AT_DEFAULT = {
    "lora_bias": False,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
    "megatron_config": None,
    "eva_config": None,
    "corda_config": None,
    "arrow_config": None,
    "use_bdlora": None,
    "kasa_config": None,
    "velora_config": None,
    "monteclora_config": None,
    "lora_ga_config": None,
}
# PEFT fields with no meaning for surgeon, read and ignored on purpose.
_IGNORED = {"peft_type", "peft_version", "auto_mapping", "loftq_config", "megatron_core",
            "qalora_group_size", "ensure_weight_tying", "inference_mode_default"}

_SENTINEL = object()
# The largest rank surgeon accepts: far above any useful LoRA rank, far below what would exhaust memory by itself.
MAX_RANK = 1 << 16


def _tupled(value):
    if isinstance(value, (set, frozenset)):
        return tuple(sorted(value))
    if isinstance(value, list):
        return tuple(value)
    return value


class PeftJson:
    """What every adapter config shares: ``replace`` (validated again), PEFT's JSON out (``to_peft_dict``)."""

    def replace(self, **changes: Any):
        """A copy with ``changes`` applied (and validated)."""
        check_kwargs(f"{type(self).__name__}.replace", changes, [f.name for f in dataclasses.fields(self)])
        return dataclasses.replace(self, **changes)

    def to_peft_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content PEFT writes for the same adapter."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value.value if isinstance(value, TaskType) \
                else dict(value) if isinstance(value, Mapping) else value
        out["peft_type"] = self.peft_type
        return dict(sorted(out.items()))

    def to_json(self) -> str:
        return json.dumps(self.to_peft_dict(), indent=2, sort_keys=True) + "\n"


@dataclasses.dataclass(frozen=True)
class LoraConfig(PeftJson):
    """A LoRA adapter's recipe, with PEFT's field names and defaults."""

    peft_type = "LORA"  # a class attribute, not a field

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: tuple[str, ...] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: tuple[int, ...] | int | None = None
    layers_pattern: tuple[str, ...] | str | None = None
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    task_type: TaskType | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern"):
            object.__setattr__(self, name, _tupled(getattr(self, name)))
        if isinstance(self.task_type, str) and not isinstance(self.task_type, TaskType):
            try:
                object.__setattr__(self, "task_type", TaskType(self.task_type))
            except ValueError:
                raise ConfigError(
                    f"LoraConfig.task_type={self.task_type!r} is not a task type; use one of "
                    f"{[t.value for t in TaskType]}{did_you_mean(self.task_type, [t.value for t in TaskType])}"
                ) from None
        problems = list(_problems(self))
        if problems:
            raise ConfigError("invalid LoraConfig:\n  - " + "\n  - ".join(problems))

    # ---- derived values -------------------------------------------------------------
    def rank_for(self, path: str) -> int:
        """The rank for the module at ``path`` (``rank_pattern`` wins over ``r``)."""
        return int(_pattern_value(self.rank_pattern, path, self.r))

    def alpha_for(self, path: str) -> float:
        """``lora_alpha`` for ``path`` (``alpha_pattern`` wins)."""
        return float(_pattern_value(self.alpha_pattern, path, self.lora_alpha))

    def scale_for(self, path: str) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``."""
        r = self.rank_for(path)
        alpha = self.alpha_for(path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # ---- PEFT JSON --------------------------------------------------------------------
    def to_peft_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content PEFT writes for the same adapter (its other fields at their defaults)."""
        return dict(sorted({**_UNSUPPORTED_AT_DEFAULT, **super().to_peft_dict()}.items()))

    @classmethod
    def from_peft_dict(cls, data: Mapping[str, Any], *, source: str = "adapter_config.json") -> LoraConfig:
        """Read PEFT's JSON. Unsupported features are errors; unknown keys are warned about by name."""
        if data.get("peft_type") != "LORA":
            raise ConfigError(
                f"{source}: peft_type={data.get('peft_type')!r}; surgeon reads LoRA, IA3 and prompt-tuning adapters "
                "(peft_type \"LORA\", \"IA3\" or \"PROMPT_TUNING\")"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs, unsupported, unknown = {}, [], []
        for key, value in data.items():
            if key in names:
                kwargs[key] = value
            elif key in _UNSUPPORTED_AT_DEFAULT:
                if value not in (_UNSUPPORTED_AT_DEFAULT[key], {}, [], False, None):
                    unsupported.append(f"{key}={value!r}")
            elif key not in _IGNORED:
                unknown.append(key)
        if unsupported:
            raise ConfigError(f"{source}: surgeon does not support {', '.join(unsupported)} yet")
        if unknown:
            warnings.warn(f"{source}: ignoring keys surgeon does not know: {', '.join(sorted(unknown))}", stacklevel=2)
        try:
            return cls(**kwargs)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

def _pattern_value(patterns: Mapping[str, Any], path: str, default: Any) -> Any:
    """PEFT's rule: the first pattern that equals ``path`` or matches a ``.``-suffix (or regex) wins."""
    for pattern, value in patterns.items():
        if path == pattern or path.endswith("." + pattern) or re.fullmatch(rf"(.*\.)?{pattern}", path):
            return value
    return default


def _problems(c: LoraConfig):
    """Every problem with ``c`` at once, each naming field, value and fix."""
    if not isinstance(c.r, int) or isinstance(c.r, bool) or not 0 < c.r <= MAX_RANK:
        yield f"r={_short(c.r)}: the rank must be a positive integer, at most {MAX_RANK} (typical values 4 to 64)"
    if not _positive(c.lora_alpha):
        yield f"lora_alpha={_short(c.lora_alpha)}: must be a finite positive number (commonly 2*r)"
    if not isinstance(c.lora_dropout, (int, float)) or not 0 <= c.lora_dropout < 1:
        yield f"lora_dropout={c.lora_dropout!r}: must be in [0, 1) (0.05 or 0.1 are usual)"
    if c.bias not in ("none", "all", "lora_only"):
        yield f"bias={c.bias!r}: use 'none', 'all' or 'lora_only'{did_you_mean(str(c.bias), ['none', 'all', 'lora_only'])}"
    if not isinstance(c.use_dora, bool):
        yield f"use_dora={c.use_dora!r}: must be True or False"
    if c.init_lora_weights not in (True, False, "gaussian"):
        yield f"init_lora_weights={c.init_lora_weights!r}: use True, False or 'gaussian'"
    for name in ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern"):
        value = getattr(c, name)
        if value is not None and not isinstance(value, str) and not (
            isinstance(value, tuple) and all(isinstance(v, str) for v in value)
        ):
            yield f"{name}={value!r}: must be a string (regex) or a list of module names"
    ltt = c.layers_to_transform
    if ltt is not None and not (
        (isinstance(ltt, int) and ltt >= 0) or (isinstance(ltt, tuple) and all(isinstance(i, int) and i >= 0 for i in ltt))
    ):
        yield f"layers_to_transform={ltt!r}: must be a layer index or a list of layer indices (>= 0)"
    for name in ("target_modules", "exclude_modules", "layers_pattern"):
        value = getattr(c, name)
        if isinstance(value, str):
            yield from _regex_problem(f"{name}={value!r}", value)
    for name, valid in (("rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_RANK),
                        ("alpha_pattern", _positive)):
        patterns = getattr(c, name)
        if not isinstance(patterns, Mapping):
            yield f"{name}={_short(patterns)}: must be a mapping of module name (or regex) to a value"
            continue
        for key, value in patterns.items():
            if not isinstance(key, str):
                yield f"{name} key {_short(key)}: must be a module name or regex string"
                continue
            yield from _regex_problem(f"{name}[{key!r}]", rf"(.*\.)?{key}")
            if not valid(value):
                what = f"an integer in [1, {MAX_RANK}]" if name == "rank_pattern" else "a finite positive number"
                yield f"{name}[{key!r}]={_short(value)}: must be {what}"


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _short(value) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int past Python's 4300-digit limit for str()
        return f"<an integer of {value.bit_length()} bits>"
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def _regex_problem(label: str, pattern: str):
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as err:
        yield f"{label}: not a valid regular expression ({err}); escape special characters or list names instead"
