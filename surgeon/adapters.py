"""Adapter directories in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``), both ways.

Names come from ``surgeon.names``; this module reads, checks and writes the files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from surgeon.config import LoraConfig
from surgeon.ia3_config import config_from_peft_dict
from surgeon.errors import AdapterError, AdapterFileError, did_you_mean
from surgeon.jsonfile import read_json
from surgeon.names import CONFIG_NAME, PICKLE_WEIGHTS_NAME, WEIGHTS_NAME, parse_peft_key
from surgeon.outputs import atomic_write_bytes, check_name, refuse_model_dir  # noqa: F401 (check_name: re-exported)


def write_adapter_dir(directory: str | os.PathLike, config: LoraConfig, tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (both atomically)."""
    directory = Path(directory)
    refuse_model_dir(directory)
    blob = save({k: v.detach().contiguous().cpu() for k, v in sorted(tensors.items())}, metadata={"format": "pt"})
    atomic_write_bytes(directory / WEIGHTS_NAME, blob)
    atomic_write_bytes(directory / CONFIG_NAME, (json.dumps(config.to_peft_dict(), indent=2, sort_keys=True) + "\n").encode())
    return directory


def read_adapter_dir(directory: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read a PEFT adapter directory (safetensors only). Every problem names the file and the fix."""
    directory = Path(directory)
    if not directory.is_dir():
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
    config = config_from_peft_dict(data, source=str(config_path))
    if not weights_path.is_file():
        if (directory / PICKLE_WEIGHTS_NAME).is_file():
            raise AdapterFileError(
                f"{directory}: only {PICKLE_WEIGHTS_NAME} (a pickle) is there; surgeon loads safetensors only. Convert it once "
                "where you trust the file: `PeftModel.from_pretrained(base, dir).save_pretrained(dir, safe_serialization=True)`"
            )
        raise AdapterFileError(f"{weights_path}: missing")
    tensors = read_weights(weights_path)
    check_ranks(config, tensors, str(weights_path))
    return config, tensors


def check_ranks(config: LoraConfig, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Each A/B pair has the rank the config gives its module, checked before any adapter memory is allocated
    (a 1 KB config claiming r=60000 must not cost gigabytes before the shape check)."""
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
    try:
        return load(Path(path).read_bytes())
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise AdapterFileError(f"{path}: not a readable safetensors file ({err}); it may be truncated or corrupt") from None


def check_tensors(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, torch.Tensor], source: str) -> None:
    """Same key set and shapes, or one error listing every missing key, unexpected key and shape mismatch."""
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
