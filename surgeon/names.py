"""Every name surgeon writes or reads, derived in one place (no torch, no numpy).

A module path such as ``transformer.h.0.attn.c_attn`` becomes: the graph attribute of its LoRA
layer, the safetensors keys PEFT uses for its A and B, and the ONNX inputs that take them. The
export directory's file names, the KV-cache inputs and outputs, and the PEFT file names live here
too. Other modules ask for a name; none rebuilds one by editing another name's string.
"""

from __future__ import annotations

# ---- graph attributes ------------------------------------------------------------------------
LORA_ROOT = "surgeon_lora"  # LoraLayer modules, one per target module
SAVED_ROOT = "surgeon_saved"  # SavedTensor modules, one per modules_to_save parameter
FOLDED_ROOT = "surgeon_folded"  # weights the fold pass wrote
DROPOUT_PREFIX = "surgeon_dropout_"  # mode-aware dropout modules made at capture


def _mangle(path: str) -> str:
    return path.replace(".", "__")


def layer_attr(path: str) -> str:
    """Graph attribute of the LoRA layer for the module at ``path``."""
    return f"{LORA_ROOT}.{_mangle(path)}"


def saved_attr(param_path: str) -> str:
    """Graph attribute of the trainable copies of parameter ``param_path`` (modules_to_save)."""
    return f"{SAVED_ROOT}.{_mangle(param_path)}"


def folded_attr(path: str, site: str) -> str:
    """Graph attribute of the merged weight the fold pass wrote for one call site of ``path``."""
    return f"{FOLDED_ROOT}.{_mangle(path)}.{site}"


def folded_saved_attr(param_path: str) -> str:
    """Graph attribute of the frozen modules_to_save copy a fold wrote."""
    return f"{FOLDED_ROOT}.saved.{_mangle(param_path)}"


def restored_attr(path: str, site: str) -> str:
    """Graph attribute of the base weight ``unfold`` put back (when it had to be recomputed)."""
    return f"{FOLDED_ROOT}.restored.{_mangle(path)}.{site}"


PROMPT_ATTR = "surgeon_prompt"  # the PromptEmbeddings module of a prompt-tuned model
PROMPT_KEY = "prompt_embeddings"  # PEFT's key for prompt tuning's [num_virtual_tokens, token_dim]


def dropout_attr(index: int) -> str:
    return f"{DROPOUT_PREFIX}{index}"


# ---- PEFT's adapter directory ------------------------------------------------------------------
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"  # refused: surgeon loads no pickle
PEFT_PREFIX = "base_model.model."
_PEFT_PARTS = {"linear": ("lora_A.weight", "lora_B.weight"), "conv1d": ("lora_A.weight", "lora_B.weight"),
               "embedding": ("lora_embedding_A", "lora_embedding_B")}


def peft_keys(path: str, kind: str) -> tuple[str, str]:
    """PEFT's safetensors keys for A and B of the module at ``path``."""
    a, b = _PEFT_PARTS[kind]
    return f"{PEFT_PREFIX}{path}.{a}", f"{PEFT_PREFIX}{path}.{b}"


DORA_PART = "lora_magnitude_vector"  # PEFT's key for DoRA's magnitude [out] (no ".weight", as PEFT saves it)


def peft_magnitude_key(path: str) -> str:
    """PEFT's safetensors key for the DoRA magnitude vector of the module at ``path``."""
    return f"{PEFT_PREFIX}{path}.{DORA_PART}"


IA3_PART = "ia3_l"  # PEFT's key for an (IA)^3 vector: [1, in] (feed-forward) or [out, 1]


def peft_ia3_key(path: str) -> str:
    return f"{PEFT_PREFIX}{path}.{IA3_PART}"


def peft_saved_key(param_path: str) -> str:
    """PEFT's key for a modules_to_save parameter (``base_model.model.<module>.<param>``)."""
    return f"{PEFT_PREFIX}{param_path}"


def parse_peft_key(key: str) -> tuple[str, str]:
    """``(module path, part)`` of a PEFT key; part is 'A', 'B', 'M' (DoRA's magnitude), or the parameter name of a
    saved module."""
    body = key.removeprefix(PEFT_PREFIX)
    if body.endswith("." + DORA_PART):
        return body[: -len(DORA_PART) - 1], "M"
    if body.endswith("." + IA3_PART):
        return body[: -len(IA3_PART) - 1], "L"
    for a, b in set(_PEFT_PARTS.values()):
        for suffix, part in ((a, "A"), (b, "B")):
            if body.endswith("." + suffix):
                return body[: -len(suffix) - 1], part
    path, _, name = body.rpartition(".")
    return path, name


# ---- model directories -------------------------------------------------------------------------
MODEL_CONFIG = "config.json"
MODEL_WEIGHTS = "model.safetensors"
MODEL_INDEX = "model.safetensors.index.json"
MODEL_FILES = (MODEL_CONFIG, MODEL_WEIGHTS, MODEL_INDEX, "pytorch_model.bin")
TOKENIZER_JSON, TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"
TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "vocab.txt", "added_tokens.json", "chat_template.jinja")

# ---- export directory ------------------------------------------------------------------------
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "surgeon-onnx/1"
MODEL_FILE = "model.onnx"
GENAI_CONFIG = "genai_config.json"  # onnxruntime-genai's description of a KV-cache export
GENERATION_CONFIG = "generation_config.json"
ADAPTER_DIR = "adapters"
ADAPTER_SUFFIX = ".onnx_adapter"
EXTERNAL_DATA_SUFFIX = ".data"  # model.onnx.data beside model.onnx for large models
_ONNX_PARTS = ("lora_A.weight", "lora_B.weight")


ADAPTER_IDS = "adapter_ids"  # an adapter bank's input: each row's slot [batch] int64 (0: the base model)
BANK_FILE = f"{ADAPTER_DIR}/bank{ADAPTER_SUFFIX}"  # every adapter of a bank, stacked by slot


def adapter_file(name: str) -> str:
    """Path of adapter ``name``'s file inside an export."""
    return f"{ADAPTER_DIR}/{name}{ADAPTER_SUFFIX}"


def onnx_input_names(path: str) -> tuple[str, str]:
    """ONNX graph inputs for A [in, lora_r] and B [lora_r, out] of the module at ``path``."""
    return f"{path}.{_ONNX_PARTS[0]}", f"{path}.{_ONNX_PARTS[1]}"


DORA_INPUT = "dora_scale"  # a DoRA site's input: g = magnitude / ||W + scale * B @ A|| per output [out]


def onnx_dora_name(path: str) -> str:
    """ONNX graph input for DoRA's per-output factor ``g`` [out] of the module at ``path`` (default ones: the base)."""
    return f"{path}.{DORA_INPUT}"


def onnx_ia3_name(path: str) -> str:
    """ONNX graph input for the (IA)^3 vector of the module at ``path`` (flat; default ones: the base)."""
    return f"{path}.{IA3_PART}"


def parse_onnx_input(name: str) -> tuple[str, str] | None:
    """``(module path, 'A', 'B', 'G' or 'L')`` of an adapter input name (G: DoRA's factor, L: an (IA)^3 vector);
    None for any other input."""
    if name == PROMPT_KEY:  # prompt tuning's virtual tokens [n, dim]
        return PROMPT_KEY, "P"
    if name.endswith("." + DORA_INPUT):
        return name[: -len(DORA_INPUT) - 1], "G"
    if name.endswith("." + IA3_PART):
        return name[: -len(IA3_PART) - 1], "L"
    for suffix, part in zip(_ONNX_PARTS, ("A", "B")):
        if name.endswith("." + suffix):
            return name[: -len(suffix) - 1], part
    return None


# ---- the KV cache of a decoder export (the names optimum and onnxruntime-genai use) -------------
DECODER_INPUTS = ("input_ids", "attention_mask", "position_ids")
LOGITS = "logits"


def past_names(layers: int) -> list[str]:
    """``past_key_values.{i}.key`` / ``.value``, layer by layer."""
    return [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def present_names(layers: int) -> list[str]:
    """``present.{i}.key`` / ``.value``, in the order of ``past_names``."""
    return [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def past_of_present(layers: int) -> dict[str, str]:
    """Each present output's name -> the past input it feeds on the next step."""
    return dict(zip(present_names(layers), past_names(layers)))
