"""A merged float model quantized again (transformers' bitsandbytes serialization), and the error that adds."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import transformers

from surgeon.compat import is_conv1d
from surgeon.quant.ops import _bnb


def requantize_checkpoint(merged, out: Path, *, bits: int) -> dict:
    """Save ``merged`` quantized again (transformers' bitsandbytes serialization, loadable with
    ``from_pretrained``) and return the relative error each quantized weight picked up."""
    dequantize_4bit = _bnb("bitsandbytes.functional").dequantize_4bit
    with tempfile.TemporaryDirectory(dir=out.parent) as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        config = transformers.BitsAndBytesConfig(
            load_in_4bit=bits == 4, load_in_8bit=bits == 8, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
        quantized = transformers.AutoModelForCausalLM.from_pretrained(staging, quantization_config=config,
                                                                      device_map="cpu")
        quantized.save_pretrained(out, safe_serialization=True)
    floats = dict(merged.named_modules())
    errors = {}
    for path, module in quantized.named_modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        scb = getattr(weight, "SCB", None)
        if state is None and scb is None:
            continue
        w = floats[path].weight.detach().float()
        if is_conv1d(floats[path]):
            w = w.t()
        back = dequantize_4bit(weight.data, state).float() if state is not None else \
            weight.data.float() * (scb.float() / 127).unsqueeze(1)
        errors[path] = float((back - w).norm() / w.norm().clamp_min(1e-12))
    worst = max(errors, key=errors.get) if errors else None
    return {"bits": bits, "layers": len(errors), "mean_relative_error": sum(errors.values()) / max(len(errors), 1),
            "max_relative_error": errors.get(worst, 0.0), "worst_layer": worst}
