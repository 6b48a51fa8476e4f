"""surgeon: LoRA as compiler passes over a captured graph, PEFT-compatible, ONNX-ready.

Names load on first use, so ``from surgeon import AdapterSession`` (ONNX Runtime only) never
imports torch.
"""

from __future__ import annotations

import importlib

from surgeon.errors import (
    AdapterError,
    CaptureError,
    ConfigError,
    SurgeonError,
    TargetNotFoundError,
    UnsupportedModuleError,
)

__version__ = "0.1.0"

_LAZY = {
    "LoraConfig": "surgeon.config", "TaskType": "surgeon.config", "IA3Config": "surgeon.ia3_config",
    "PromptTuningConfig": "surgeon.prompt_config",
    "capture": "surgeon.capturing", "match": "surgeon.matching",
    "inject_lora": "surgeon.passes.lora", "fold": "surgeon.passes.fold", "unfold": "surgeon.passes.fold",
    "SurgeonModel": "surgeon.model", "get_peft_model": "surgeon.model",
    "AutoPeftModel": "surgeon.auto", "AutoPeftModelForCausalLM": "surgeon.auto",
    "AutoPeftModelForSequenceClassification": "surgeon.auto",
    "export_onnx": "surgeon.onnx.export", "AdapterSession": "surgeon.onnx.runtime",
    "run_checks": "surgeon.workflows.checks", "load_model": "surgeon.hub", "load_tokenizer": "surgeon.hub",
    "capture_decoder": "surgeon.capturing", "GenerationError": "surgeon.errors",
}
# Submodules reachable as attributes (``surgeon.checks.run_checks``), including where they used to live.
_MODULES = {"layers": "surgeon.layers", "passes": "surgeon.passes", "onnx": "surgeon.onnx", "adapters": "surgeon.adapters",
            "hub": "surgeon.hub", "model": "surgeon.model", "config": "surgeon.config", "names": "surgeon.names",
            "quant": "surgeon.quant", "checks": "surgeon.workflows.checks", "generation": "surgeon.model.generate"}
_ALIASES = {"PeftModel": "SurgeonModel"}  # PEFT's name: `PeftModel.from_pretrained(base, dir)` reads the same

__all__ = sorted([*_LAZY, *_ALIASES, "AdapterError", "CaptureError", "ConfigError", "SurgeonError",
                  "TargetNotFoundError", "UnsupportedModuleError"])


def __getattr__(name: str):
    target = _ALIASES.get(name, name)
    if target in _LAZY:
        value = getattr(importlib.import_module(_LAZY[target]), target)
        globals()[name] = value
        return value
    if name in _MODULES:
        return importlib.import_module(_MODULES[name])
    raise AttributeError(f"module 'surgeon' has no attribute {name!r}")


def __dir__():
    return __all__
