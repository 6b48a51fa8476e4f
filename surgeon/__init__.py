"""surgeon: LoRA as compiler passes over a captured graph, PEFT-compatible, ONNX-ready."""

from surgeon.capture import capture
from surgeon.config import LoraConfig, TaskType
from surgeon.errors import (
    AdapterError,
    CaptureError,
    ConfigError,
    SurgeonError,
    TargetNotFoundError,
    UnsupportedModuleError,
)
from surgeon.match import match
from surgeon.auto import AutoPeftModel, AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification
from surgeon.model import SurgeonModel, get_peft_model
from surgeon.passes.lora import inject_lora

PeftModel = SurgeonModel  # PEFT's name, so `PeftModel.from_pretrained(base, dir)` reads the same

__version__ = "0.1.0"
__all__ = [
    "AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForSequenceClassification", "PeftModel",
    "AdapterError", "CaptureError", "ConfigError", "LoraConfig", "SurgeonError", "SurgeonModel",
    "TargetNotFoundError", "TaskType", "UnsupportedModuleError", "capture", "get_peft_model",
    "inject_lora", "match",
]
