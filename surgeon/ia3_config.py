"""``IA3Config``: (IA)^3's recipe with PEFT's field names and defaults, and PEFT JSON of either method.

Beside ``LoraConfig`` (which it reuses for the shared parts: task types, tuple normalisation), so the
shared target matching reads both: an IA3 config answers the LoRA-only questions (rank, scale,
layers_to_transform) with fixed values.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping
from typing import Any

from surgeon.config import _IGNORED, LoraConfig, PeftJson, TaskType, _tupled
from surgeon.errors import ConfigError
from surgeon.prompt_config import PromptTuningConfig

# What PEFT targets for IA3 when target_modules / feedforward_modules are None (PEFT's per-architecture facts).
IA3_DEFAULT_TARGETS = {
    "gpt2": ("c_attn", "mlp.c_proj"), "llama": ("k_proj", "v_proj", "down_proj"),
    "mistral": ("k_proj", "v_proj", "down_proj"), "mixtral": ("k_proj", "v_proj", "w2"),
    "qwen2": ("q_proj", "v_proj", "down_proj"), "qwen3": ("q_proj", "v_proj", "down_proj"),
    "gemma": ("q_proj", "v_proj", "down_proj"), "gemma2": ("q_proj", "v_proj", "down_proj"),
    "opt": ("q_proj", "k_proj", "fc2"), "phi": ("q_proj", "v_proj", "fc2"), "t5": ("k", "v", "wo"),
    "bert": ("key", "value", "output.dense"), "roberta": ("key", "value", "output.dense"),
    "falcon": ("query_key_value", "dense_4h_to_h"), "gpt_neox": ("query_key_value", "dense_4h_to_h"),
    "bloom": ("query_key_value", "mlp.dense_4h_to_h"),
}
IA3_DEFAULT_FEEDFORWARD = {k: (v[-1],) for k, v in IA3_DEFAULT_TARGETS.items()}  # PEFT's: the last of each


@dataclasses.dataclass(frozen=True)
class IA3Config(PeftJson):
    """An (IA)^3 adapter's recipe, with PEFT's field names and defaults: a learned vector scales each target's
    output, or its input where the target is one of ``feedforward_modules``."""

    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    feedforward_modules: tuple[str, ...] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: tuple[str, ...] | None = None
    init_ia3_weights: bool = True
    task_type: TaskType | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    # what the shared matching reads, fixed for IA3 (PEFT's IA3Config has no such fields)
    layers_to_transform = None
    layers_pattern = None
    use_dora = False
    bias = "none"
    peft_type = "IA3"
    default_targets = IA3_DEFAULT_TARGETS

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules", "feedforward_modules", "modules_to_save"):
            object.__setattr__(self, name, _tupled(getattr(self, name)))
        if isinstance(self.task_type, str) and not isinstance(self.task_type, TaskType):
            object.__setattr__(self, "task_type", TaskType(self.task_type))
        problems = [f"{n}={getattr(self, n)!r}: must be a string (regex) or a list of module names"
                    for n in ("target_modules", "exclude_modules", "feedforward_modules", "modules_to_save")
                    if getattr(self, n) is not None and not isinstance(getattr(self, n), (str, tuple))]
        ff, targets = self.feedforward_modules, self.target_modules
        if isinstance(ff, tuple) and isinstance(targets, tuple) and not set(ff) <= set(targets):
            problems.append(f"feedforward_modules {sorted(set(ff) - set(targets))} are not in target_modules "
                            f"{list(targets)}; every feed-forward module must be a target too (add it there)")
        if not isinstance(self.init_ia3_weights, bool):
            problems.append(f"init_ia3_weights={self.init_ia3_weights!r}: must be True (ones) or False (random)")
        if problems:
            raise ConfigError("invalid IA3Config:\n  - " + "\n  - ".join(problems))

    def rank_for(self, path: str) -> int:  # the shared target table's columns: an IA3 vector has no rank
        return 1

    def alpha_for(self, path: str) -> float:
        return 1.0

    def scale_for(self, path: str) -> float:
        return 1.0

    def is_feedforward(self, path: str, model_type: str | None) -> bool:
        """PEFT's rule: a regex must match the whole path, a name must end it; None: the architecture's default."""
        ff = self.feedforward_modules
        if ff is None:
            if model_type not in IA3_DEFAULT_FEEDFORWARD:
                raise ConfigError(f"IA3Config.feedforward_modules is not set and surgeon has no default for "
                                  f"model_type={model_type!r}; set it (a subset of target_modules, or [])")
            ff = IA3_DEFAULT_FEEDFORWARD[model_type]
        return re.fullmatch(ff, path) is not None if isinstance(ff, str) else any(path.endswith(n) for n in ff)


def config_from_peft_dict(data: Mapping[str, Any], *, source: str = "adapter_config.json"):
    """A ``LoraConfig``, ``IA3Config`` or ``PromptTuningConfig`` from PEFT's JSON, by its ``peft_type``."""
    kind = {"IA3": IA3Config, "PROMPT_TUNING": PromptTuningConfig}.get(data.get("peft_type"))
    if kind is None:
        return LoraConfig.from_peft_dict(data, source=source)
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - names - _IGNORED)
    if unknown:
        warnings.warn(f"{source}: ignoring keys surgeon does not know: {', '.join(unknown)}", stacklevel=2)
    try:
        return kind(**{k: v for k, v in data.items() if k in names})
    except (ConfigError, ValueError) as err:
        raise ConfigError(f"{source}: {err}") from None
