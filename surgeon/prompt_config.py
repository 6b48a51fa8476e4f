"""``PromptTuningConfig``: prompt tuning's recipe with PEFT's field names and defaults.

Learned virtual-token embeddings go in front of the input's embeddings; the attention mask gets ones and the
labels -100 for them, as PEFT does. ``token_dim``, ``num_attention_heads`` and ``num_layers`` are filled from the
base model when the adapter is created (PEFT records them too).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from surgeon.config import PeftJson, TaskType
from surgeon.errors import ConfigError, did_you_mean

PROMPT_INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


@dataclasses.dataclass(frozen=True)
class PromptTuningConfig(PeftJson):
    """Prompt tuning: ``num_virtual_tokens`` trained embeddings prepended to every input (PEFT's fields)."""

    num_virtual_tokens: int | None = None
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: Mapping[str, Any] | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: tuple[str, ...] | None = None
    task_type: TaskType | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    peft_type = "PROMPT_TUNING"  # class attributes the shared code reads, not fields
    use_dora = False
    bias = "none"

    def __post_init__(self) -> None:
        init = getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)
        object.__setattr__(self, "prompt_tuning_init", init)
        if isinstance(self.task_type, str) and not isinstance(self.task_type, TaskType):
            object.__setattr__(self, "task_type", TaskType(self.task_type))
        problems = []
        n = self.num_virtual_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            problems.append(f"num_virtual_tokens={n!r}: give the number of virtual tokens, a positive integer "
                            "(8 to 20 are usual)")
        if init not in PROMPT_INITS:
            problems.append(f"prompt_tuning_init={init!r}: use one of {list(PROMPT_INITS)}"
                            f"{did_you_mean(str(init), PROMPT_INITS)}")
        if init == "TEXT" and not (self.prompt_tuning_init_text and self.tokenizer_name_or_path):
            problems.append("prompt_tuning_init='TEXT' needs prompt_tuning_init_text and tokenizer_name_or_path (a "
                            "local tokenizer directory or a built-in model name)")
        if self.tokenizer_kwargs and init != "TEXT":
            problems.append("tokenizer_kwargs is only read with prompt_tuning_init='TEXT'")
        if self.num_transformer_submodules not in (None, 1):
            problems.append(f"num_transformer_submodules={self.num_transformer_submodules}: surgeon's prompt tuning "
                            "covers decoder-only models (1)")
        if self.task_type not in (None, TaskType.CAUSAL_LM):
            problems.append(f"task_type={self.task_type.value}: surgeon's prompt tuning covers CAUSAL_LM (a "
                            "classifier would also need its head trained as modules_to_save); use LoRA or IA3 for it")
        if self.modules_to_save:
            problems.append(f"modules_to_save={list(self.modules_to_save)}: not with prompt tuning in surgeon yet")
        if problems:
            raise ConfigError("invalid PromptTuningConfig:\n  - " + "\n  - ".join(problems))
