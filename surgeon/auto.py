"""``AutoPeftModel*``: load the base named in ``adapter_config.json``, then the adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from surgeon.adapters import read_adapter_dir
from surgeon.compat import check_kwargs, params_of
from surgeon.errors import AdapterFileError
from surgeon.hub import load_model
from surgeon.model import SurgeonModel
from surgeon.names import CONFIG_NAME


class AutoPeftModel:
    """``from_pretrained(adapter_dir)``: base from ``base_model_name_or_path`` (a local directory or built-in name)."""

    task: str | None = None

    @classmethod
    def from_pretrained(cls, adapter_dir: str, adapter_name: str = "default", is_trainable: bool = False,
                        **kwargs: Any):
        check_kwargs(f"{cls.__name__}.from_pretrained", kwargs, params_of(cls.from_pretrained),
                     "surgeon loads the base named in adapter_config.json as it is; to load it another way, "
                     "load it yourself and call PeftModel.from_pretrained(base, adapter_dir)")
        config, _tensors = read_adapter_dir(adapter_dir)
        base_name = config.base_model_name_or_path
        if not base_name:
            raise AdapterFileError(f"{Path(adapter_dir) / CONFIG_NAME}: base_model_name_or_path is empty; "
                                   "load the base yourself and call PeftModel.from_pretrained(base, dir)")
        base = load_model(base_name, task=cls.task or (config.task_type.value if config.task_type else None))
        return SurgeonModel.from_pretrained(base, adapter_dir, adapter_name=adapter_name, is_trainable=is_trainable)


class AutoPeftModelForCausalLM(AutoPeftModel):
    task = "CAUSAL_LM"


class AutoPeftModelForSequenceClassification(AutoPeftModel):
    task = "SEQ_CLS"
