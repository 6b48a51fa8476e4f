"""Names, and adapter directories in PEFT's format.

One place owns every name: the graph attribute of a LoRA layer, the safetensors key PEFT
uses, and the ONNX input name all derive from the module path here, so export, files and
runtime cannot disagree.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from surgeon.config import LoraConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
LORA_ROOT = "surgeon_lora"
SAVED_ROOT = "surgeon_saved"


def _mangle(path: str) -> str:
    return path.replace(".", "__")


def layer_attr(path: str) -> str:
    """Graph/registry attribute of the LoRA layer for the module at ``path``."""
    return f"{LORA_ROOT}.{_mangle(path)}"


def saved_attr(param_path: str) -> str:
    """Graph/registry attribute of the trainable copy of parameter ``param_path`` (modules_to_save)."""
    return f"{SAVED_ROOT}.{_mangle(param_path)}"


def peft_keys(path: str, kind: str) -> tuple[str, str]:
    """PEFT's safetensors keys for A and B of the module at ``path``."""
    if kind == "embedding":
        return f"{PEFT_PREFIX}{path}.lora_embedding_A", f"{PEFT_PREFIX}{path}.lora_embedding_B"
    return f"{PEFT_PREFIX}{path}.lora_A.weight", f"{PEFT_PREFIX}{path}.lora_B.weight"


def peft_saved_key(param_path: str) -> str:
    """PEFT's key for a modules_to_save parameter (``base_model.model.<module>.<param>``)."""
    return f"{PEFT_PREFIX}{param_path}"


def onnx_input_names(path: str) -> tuple[str, str]:
    """ONNX graph inputs for A [in, lora_r] and B [lora_r, out] of the module at ``path``."""
    return f"{path}.lora_A.weight", f"{path}.lora_B.weight"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_adapter_dir(directory: str | os.PathLike, config: LoraConfig, tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (both atomically)."""
    from safetensors.torch import save

    directory = Path(directory)
    blob = save({k: v.detach().contiguous().cpu() for k, v in sorted(tensors.items())}, metadata={"format": "pt"})
    atomic_write_bytes(directory / WEIGHTS_NAME, blob)
    atomic_write_bytes(directory / CONFIG_NAME, (json.dumps(config.to_peft_dict(), indent=2, sort_keys=True) + "\n").encode())
    return directory
