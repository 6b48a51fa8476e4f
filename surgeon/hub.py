"""Models by name: a local Hugging Face directory or a built-in model shipped with surgeon."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from surgeon.errors import ModelNotFoundError, did_you_mean

ASSETS = Path(__file__).parent / "assets"
BUILTIN = {"tiny-gpt2": ASSETS / "tiny-gpt2"}
# What `surgeon train` adapts on a built-in model when no -t is given (attention and MLP: a clear effect).
BUILTIN_TARGETS = {"tiny-gpt2": ("c_attn", "c_proj", "c_fc")}
DEFAULT_MODEL = "tiny-gpt2"
DEFAULT_DATA = ASSETS / "corpus" / "finetune.txt"
DEFAULT_HELDOUT = ASSETS / "corpus" / "finetune_heldout.txt"


def model_dir(name: str) -> Path:
    """The directory for ``name``: a built-in name or an existing local directory with config.json."""
    if name in BUILTIN:
        return BUILTIN[name]
    path = Path(name)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir():
        raise ModelNotFoundError(f"{name}: directory has no config.json; give a Hugging Face model directory "
                                 "(save_pretrained output) or a built-in name: " + ", ".join(BUILTIN))
    raise ModelNotFoundError(f"{name}: no such directory and not a built-in model{did_you_mean(name, BUILTIN)}; "
                             f"built-in: {', '.join(BUILTIN)} (surgeon never downloads models)")


def load_model(name: str, *, task: str | None = None) -> nn.Module:
    """Load a transformers model from safetensors only (no pickle), in fp32, on CPU."""
    import transformers

    path = model_dir(name)
    if not any(path.glob("*.safetensors")):
        raise ModelNotFoundError(f"{path}: no *.safetensors weights; surgeon loads safetensors only (no pickle). "
                                 "Convert with: AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
    config = json.loads((path / "config.json").read_text())
    archs = config.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    autos = {"SEQ_CLS": transformers.AutoModelForSequenceClassification, "CAUSAL_LM": transformers.AutoModelForCausalLM,
             "TOKEN_CLS": transformers.AutoModelForTokenClassification}
    if task in autos and not (cls is not None and cls.__name__.endswith(autos[task].__name__[len("AutoModel"):])):
        cls = autos[task]
    if cls is None:
        cls = transformers.AutoModelForCausalLM
    return cls.from_pretrained(path, use_safetensors=True, dtype="float32")


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir(name))
