"""Names, and adapter directories in PEFT's format.

One place owns every name: the graph attribute of a LoRA layer, the safetensors key PEFT
uses, and the ONNX input name all derive from the module path here, so export, files and
runtime cannot disagree.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from surgeon.config import LoraConfig
from surgeon.jsonfile import read_json
from surgeon.outputs import atomic_write_bytes

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
LORA_ROOT = "surgeon_lora"
SAVED_ROOT = "surgeon_saved"


def check_name(name: object, what: str = "adapter name") -> str:
    """``name`` when it can be one file or directory name inside OUT; otherwise an error saying why.

    One path component: not empty, not ``.`` or ``..``, no ``/`` or ``\\``, no control characters.
    Every name that becomes a path (``--name``, ``adapter_name`` in ``save_pretrained``) passes here.
    """
    from surgeon.errors import AdapterError

    problem = None
    if not isinstance(name, str):
        problem = f"must be a string, got {type(name).__name__}"
    elif not name.strip():
        problem = "is empty"
    elif name in (".", ".."):
        problem = "is a directory reference, not a name"
    elif any(sep in name for sep in ("/", "\\")):
        problem = "contains a path separator; it must be one name, not a path"
    elif any(ord(ch) < 32 for ch in name):
        problem = "contains a control character"
    elif len(name.encode()) > 200:
        problem = "is longer than 200 bytes"
    if problem:
        raise AdapterError(f"{what} {name!r} {problem}; use letters, digits, '-', '_' or '.' (e.g. 'my-adapter')")
    return name


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


MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def refuse_model_dir(directory: Path) -> None:
    """An adapter never goes into a model's directory: transformers would then load that model as a PEFT model."""
    from surgeon.errors import AdapterError

    found = [name for name in MODEL_FILES if (Path(directory) / name).is_file()]
    if found:
        raise AdapterError(f"{directory}: is a model directory (it holds {', '.join(found)}); adapters go in their own "
                           "directory, e.g. -o runs/my-adapter")


def write_adapter_dir(directory: str | os.PathLike, config: LoraConfig, tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (both atomically)."""
    from safetensors.torch import save

    directory = Path(directory)
    refuse_model_dir(directory)
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
    data = read_json(config_path, AdapterFileError)
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
    tensors = read_weights(weights_path)
    check_ranks(config, tensors, str(weights_path))
    return config, tensors


def check_ranks(config: LoraConfig, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Each A/B pair has the rank the config gives its module, checked before any adapter memory is allocated
    (a 1 KB config claiming r=60000 must not cost gigabytes before the shape check)."""
    from surgeon.errors import AdapterError

    wrong = []
    for key, tensor in tensors.items():
        path, part = parse_peft_key(key)
        if part not in ("A", "B"):
            continue
        if tensor.dim() != 2:
            wrong.append(f"{key}: {tuple(tensor.shape)} is not a matrix")
            continue
        rank = tensor.shape[0] if part == "A" else tensor.shape[1]
        want = config.rank_for(path)
        if rank != want:
            wrong.append(f"{key}: rank {rank} in the file, {want} in the config")
    if wrong:
        raise AdapterError(f"{source}: the adapter's tensors disagree with its config ({len(wrong)}): "
                           + "; ".join(wrong[:5]) + ("; ..." if len(wrong) > 5 else "")
                           + ". Use the adapter_config.json saved with these weights")


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
