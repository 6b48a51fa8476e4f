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


def parse_peft_key(key: str) -> tuple[str, str]:
    """``(module path, part)`` of a PEFT key; part is 'A', 'B', or the parameter name of a saved module."""
    body = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    for suffix, part in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_embedding_A", "A"), (".lora_embedding_B", "B")):
        if body.endswith(suffix):
            return body[: -len(suffix)], part
    path, _, name = body.rpartition(".")
    return path, name


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


def read_adapter_dir(directory: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read a PEFT adapter directory (safetensors only). Every problem names the file and the fix."""
    from surgeon.errors import AdapterFileError, ConfigError

    directory = Path(directory)
    if not directory.is_dir():
        from surgeon.errors import did_you_mean

        parent = directory.parent if directory.parent.is_dir() else None
        siblings = [p.name for p in parent.iterdir() if (p / CONFIG_NAME).is_file()] if parent else []
        hint = did_you_mean(directory.name, siblings).replace("'", "")
        raise AdapterFileError(f"{directory}: no such adapter directory{hint} (expected {CONFIG_NAME} and "
                               f"{WEIGHTS_NAME} inside)")
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_path.is_file():
        raise AdapterFileError(f"{config_path}: missing; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{config_path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or "peft_type" not in data:
        raise AdapterFileError(f"{config_path}: no 'peft_type' field; is this a PEFT adapter_config.json?")
    try:
        config = LoraConfig.from_peft_dict(data, source=str(config_path))
    except ConfigError:
        raise
    if not weights_path.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise AdapterFileError(
                f"{directory}: only adapter_model.bin (a pickle) is there; surgeon loads safetensors only. Convert it once "
                "where you trust the file: `PeftModel.from_pretrained(base, dir).save_pretrained(dir, safe_serialization=True)`"
            )
        raise AdapterFileError(f"{weights_path}: missing")
    return config, read_weights(weights_path)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    from surgeon.errors import AdapterFileError

    try:
        return load(Path(path).read_bytes())
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise AdapterFileError(f"{path}: not a readable safetensors file ({err}); it may be truncated or corrupt") from None


def check_tensors(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, torch.Tensor], source: str) -> None:
    """Same key set and shapes, or one error listing every missing key, unexpected key and shape mismatch."""
    from surgeon.errors import AdapterError

    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(f"{k}: file {tuple(found[k].shape)} vs model {tuple(expected[k])}"
                    for k in set(expected) & set(found) if tuple(found[k].shape) != tuple(expected[k]))
    if not (missing or unexpected or shapes):
        return
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (an adapter for another base model?): " + "; ".join(shapes))
    if missing:
        parts.append(f"{len(missing)} missing keys: " + ", ".join(missing))
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: " + ", ".join(unexpected))
    raise AdapterError(f"{source} does not fit this model: " + " | ".join(parts))
