"""Models by name: a local Hugging Face directory or a built-in model shipped with surgeon."""

from __future__ import annotations

import shutil
from pathlib import Path

import transformers
from safetensors import SafetensorError, safe_open
from torch import nn

from surgeon.bundled import ASSETS, BUILTIN  # noqa: F401 (ASSETS: where the examples find the bundled files)
from surgeon.errors import ModelFileError, ModelNotFoundError, did_you_mean
from surgeon.jsonfile import read_json
from surgeon.names import CONFIG_NAME, MODEL_CONFIG, MODEL_INDEX, MODEL_WEIGHTS, TOKENIZER_FILES

def model_dir(name: str) -> Path:
    """The directory for ``name``: a built-in name or an existing local directory with config.json."""
    if name in BUILTIN:
        return BUILTIN[name]
    path = Path(name)
    if path.is_dir() and (path / MODEL_CONFIG).is_file():
        return path
    if path.is_dir():
        raise ModelNotFoundError(f"{name}: directory has no config.json; give a Hugging Face model directory "
                                 "(save_pretrained output) or a built-in name: " + ", ".join(BUILTIN))
    raise ModelNotFoundError(f"{name}: no such directory and not a built-in model{did_you_mean(name, BUILTIN)}; "
                             f"built-in: {', '.join(BUILTIN)} (surgeon never downloads models)")


def read_model_config(path: Path) -> dict:
    """``config.json`` of a model directory as a dict, or an error naming the file."""
    config_path = path / MODEL_CONFIG
    config = read_json(config_path, ModelFileError, "restore it from the model's source")
    if not isinstance(config, dict):
        raise ModelFileError(f"{config_path}: must hold a JSON object, got {type(config).__name__}")
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise ModelFileError(f"{config_path}: 'architectures' must be a list of class names, got {archs!r}")
    return config


def weight_files(path: Path) -> list[Path]:
    """The safetensors files transformers would read, each checked to open (a truncated file is named)."""
    if (path / CONFIG_NAME).is_file():
        raise ModelFileError(f"{path}: holds adapter_config.json: it is (or contains) a PEFT adapter, not a base model; "
                             "load the base, then PeftModel.from_pretrained(base, ADAPTER_DIR); remove the adapter "
                             "files if they were written into the model's directory by mistake")
    index = path / MODEL_INDEX
    if index.is_file():
        data = read_json(index, ModelFileError)
        try:
            shards = sorted(set(data["weight_map"].values()))
        except (KeyError, TypeError, AttributeError) as err:
            raise ModelFileError(f"{index}: not a safetensors index (no 'weight_map' of file names: {err})") from None
        files = [path / shard for shard in shards]
    elif (path / MODEL_WEIGHTS).is_file():
        files = [path / MODEL_WEIGHTS]
    else:
        others = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt"))
        raise ModelFileError(f"{path}: no model.safetensors (or model.safetensors.index.json)"
                             + (f"; found {', '.join(others)}" if others else "")
                             + ". surgeon loads safetensors only (no pickle). Convert with: "
                             "AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
    for f in files:
        if not f.is_file():
            raise ModelFileError(f"{f}: listed in the index but missing")
        try:
            with safe_open(str(f), "np") as handle:
                handle.keys()
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise ModelFileError(f"{f}: not a readable safetensors file ({err}); it may be truncated or corrupt "
                                 f"({f.stat().st_size} bytes)") from None
    return files


def load_model(name: str, *, task: str | None = None) -> nn.Module:
    """Load a transformers model from safetensors only (no pickle), in fp32, on CPU."""
    path = model_dir(name)
    config = read_model_config(path)
    weight_files(path)
    archs = config.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    autos = {"SEQ_CLS": transformers.AutoModelForSequenceClassification, "CAUSAL_LM": transformers.AutoModelForCausalLM,
             "TOKEN_CLS": transformers.AutoModelForTokenClassification}
    if task in autos and not (cls is not None and cls.__name__.endswith(autos[task].__name__[len("AutoModel"):])):
        cls = autos[task]
    if cls is None:
        cls = transformers.AutoModelForCausalLM
    try:
        return cls.from_pretrained(path, use_safetensors=True, dtype="float32")
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelFileError(f"{path}: transformers could not load it as {cls.__name__} ({first})") from None


def load_tokenizer(name: str):
    return transformers.AutoTokenizer.from_pretrained(model_dir(name))


def copy_tokenizer_files(source: Path, target: Path) -> list[str]:
    """Copy the tokenizer files ``source`` has into ``target``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
            copied.append(name)
    return copied
