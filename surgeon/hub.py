"""Models by name: a local Hugging Face directory or a built-in model shipped with surgeon."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import transformers
from safetensors import SafetensorError, safe_open
from torch import nn

from surgeon.bundled import ASSETS, BUILTIN  # noqa: F401 (ASSETS: where the examples find the bundled files)
from surgeon.errors import ModelFileError, ModelNotFoundError, did_you_mean
from surgeon.jsonfile import read_json
from surgeon.names import (
    CONFIG_NAME,
    GENERATION_CONFIG,
    MODEL_CONFIG,
    MODEL_INDEX,
    MODEL_WEIGHTS,
    TOKENIZER_CONFIG,
    TOKENIZER_FILES,
    TOKENIZER_JSON,
)

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


# transformers 5 writes this class name, which 4.x cannot import; PreTrainedTokenizerFast reads the same
# tokenizer.json in 4.x, loads as TokenizersBackend in 5.x, and onnxruntime-genai's tokenizer accepts it; 4.x also
# needs the model's input names, or it returns token_type_ids that a decoder's generate refuses.
PORTABLE_TOKENIZER_CLASS = {"TokenizersBackend": "PreTrainedTokenizerFast"}
TOKENIZER_INPUTS = ("input_ids", "attention_mask")


def copy_tokenizer_files(source: Path, target: Path) -> list[str]:
    """Copy the tokenizer files ``source`` has into ``target``; returns their names.

    ``tokenizer_config.json`` naming a class only transformers 5 knows gets the class both 4.x and 5.x (and
    onnxruntime-genai) read; every other field and file is copied as is.
    """
    copied = []
    for name in TOKENIZER_FILES:
        if not (source / name).is_file():
            continue
        if name == TOKENIZER_CONFIG and (source / TOKENIZER_JSON).is_file():
            config = read_json(source / name, ModelFileError, "restore it from the model's source")
            if isinstance(config, dict) and config.get("tokenizer_class") in PORTABLE_TOKENIZER_CLASS:
                config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS[config["tokenizer_class"]]
                config.setdefault("model_input_names", list(TOKENIZER_INPUTS))  # 4.x would add token_type_ids
                (target / name).write_text(json.dumps(config, indent=2) + "\n")
                copied.append(name)
                continue
        shutil.copy2(source / name, target / name)
        copied.append(name)
    return copied


def write_model_config(model: nn.Module, source: Path | None, target: Path) -> list[str]:
    """``config.json`` (and ``generation_config.json``) of the source model into ``target``: copied from
    ``source`` when it has them, else written from the loaded model's config; returns the names written."""
    written = []
    for name, obj in ((MODEL_CONFIG, model.config), (GENERATION_CONFIG, getattr(model, "generation_config", None))):
        if source is not None and (source / name).is_file():
            shutil.copy2(source / name, target / name)
        elif obj is not None:
            (target / name).write_text(obj.to_json_string(use_diff=name == GENERATION_CONFIG))
        else:
            continue
        written.append(name)
    return written
