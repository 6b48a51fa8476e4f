"""``get_peft_model``: PEFT's entry point, over ``SurgeonModel``."""

from __future__ import annotations

from typing import Any

from torch import nn

from surgeon.compat import check_kwargs, params_of, refuse_peft_load_flags, refuse_value
from surgeon.config import LoraConfig
from surgeon.errors import AdapterError
from surgeon.ia3_config import IA3Config
from surgeon.model.peft_model import SurgeonModel
from surgeon.prompt_config import PromptTuningConfig


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default", mixed: bool = False,
                   autocast_adapter_dtype: bool = True, revision: str | None = None, low_cpu_mem_usage: bool = False,
                   compile: bool = False, **kwargs: Any) -> SurgeonModel:
    """Capture ``model``, inject ``peft_config``'s LoRA, freeze everything else (PEFT's entry point).

    PEFT's other arguments are accepted by name at the values surgeon honours and refused otherwise.
    ``compile=True`` (surgeon's): every injected graph runs through ``torch.compile`` (inductor).
    """
    check_kwargs("get_peft_model", kwargs, params_of(get_peft_model))
    refuse_value("get_peft_model", "mixed", mixed, [False], "surgeon has no PeftMixedModel; add adapters of one method")
    refuse_value("get_peft_model", "revision", revision, [None], "surgeon loads nothing from a hub")
    refuse_peft_load_flags("get_peft_model", autocast_adapter_dtype, low_cpu_mem_usage)
    if not isinstance(peft_config, (LoraConfig, IA3Config, PromptTuningConfig)):
        raise AdapterError(f"get_peft_model takes a surgeon.LoraConfig or surgeon.IA3Config, got "
                           f"{type(peft_config).__name__}; build one with surgeon.LoraConfig(...) (same fields as "
                           "peft.LoraConfig), surgeon.IA3Config or surgeon.PromptTuningConfig")
    peft_model = SurgeonModel(model, peft_config, adapter_name)
    peft_model.compile_graphs = bool(compile)
    return peft_model
