"""``genai_config.json``: what onnxruntime-genai needs to open a KV-cache export as written (the ONNX Runtime side:
no torch).

Every value comes from the graph (input and output names, cache dims, vocabulary) or from the manifest's
``generation`` facts recorded at export (special tokens, context length, attention heads, hidden size); nothing is
a template default. ``check_genai_config`` reads a written config back against the graph, for ``surgeon check``.

Facts about onnxruntime-genai 0.18 this relies on: model type ``decoder`` is its generic decoder-only model (the
named types such as ``gpt2`` expect other cache layouts); ``%d`` in the cache names is the layer index; our graph
concatenates past and new keys, so the past and present buffers cannot be shared
(``search.past_present_share_buffer: false``); ``session_options.graph_optimization_level`` is an ONNX Runtime
level name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from surgeon.names import DECODER_INPUTS, GENAI_CONFIG, LOGITS, past_names, present_names

MODEL_TYPE = "decoder"
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"
# ORT's extended level fuses DequantizeLinear + MatMul into a matmul over dynamically quantized activations
# (about 0.5% off): an 8-bit export runs at the basic level, as AdapterSession runs it without that optimizer.
QUANTIZED_LEVEL = {8: "ORT_ENABLE_BASIC"}


class GenaiUnsupported(ValueError):
    """The graph has a shape onnxruntime-genai cannot describe (the reason is the message)."""


def _dims(values) -> dict[str, list]:
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}


def cache_shape(proto, layers: int) -> tuple[int, int]:
    """``(kv heads, head size)`` shared by every layer's past key and value; GenaiUnsupported when they differ."""
    inputs = _dims(proto.graph.input)
    shapes = {tuple(inputs[n][1:2] + inputs[n][3:4]) for n in past_names(layers) if n in inputs}
    if len(shapes) != 1 or not all(isinstance(d, int) and d > 0 for d in next(iter(shapes))):
        raise GenaiUnsupported(f"the cache inputs have {len(shapes)} different (heads, head size) shapes "
                               f"{sorted(shapes)[:4]}; onnxruntime-genai describes one shape for every layer")
    heads, head_size = next(iter(shapes))
    return heads, head_size


def genai_config(proto, facts: dict[str, Any], model_file: str, quant_bits: int | None = None) -> dict:
    """The ``genai_config.json`` content for a KV-cache export, from its graph and its manifest facts."""
    layers = facts["layers"]
    heads, head_size = cache_shape(proto, layers)
    logits = _dims(proto.graph.output)[LOGITS]
    vocab = logits[2] if isinstance(logits[2], int) else facts.get("vocab_size")
    eos = facts.get("eos_token_id") or []
    pad = facts.get("pad_token_id")
    bos = facts.get("bos_token_id")
    missing = [k for k, v in (("vocab_size", vocab), ("context_length", facts.get("context_length")),
                              ("eos_token_id", eos or None)) if not v]
    if missing:
        raise GenaiUnsupported(f"the model config gives no {', '.join(missing)}, which onnxruntime-genai requires")
    outside = [f"{field} {i}" for field, ids in (("eos_token_id", eos), ("bos_token_id", [bos]), ("pad_token_id", [pad]))
               for i in ids if i is not None and not 0 <= i < vocab]
    if outside:
        raise GenaiUnsupported(f"the model config's {', '.join(outside)} is outside the vocabulary of {vocab} tokens, "
                               "which onnxruntime-genai refuses; set those ids below vocab_size in config.json (or "
                               "the config you build the model from) and export again")
    session: dict[str, Any] = {"log_id": "onnxruntime-genai", "provider_options": []}
    if quant_bits in QUANTIZED_LEVEL:
        session["graph_optimization_level"] = QUANTIZED_LEVEL[quant_bits]
    return {
        "model": {
            "type": MODEL_TYPE,
            "bos_token_id": bos if bos is not None else eos[0],
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": pad if pad is not None else eos[0],
            "vocab_size": vocab,
            "context_length": facts["context_length"],
            "decoder": {
                "filename": model_file,
                "session_options": session,
                "num_hidden_layers": layers,
                "num_attention_heads": facts.get("attention_heads") or heads,
                "num_key_value_heads": heads,
                "head_size": head_size,
                "hidden_size": facts.get("hidden_size") or heads * head_size,
                "inputs": {"input_ids": DECODER_INPUTS[0], "attention_mask": DECODER_INPUTS[1],
                           "position_ids": DECODER_INPUTS[2], "past_key_names": PAST_KEY,
                           "past_value_names": PAST_VALUE},
                "outputs": {"logits": LOGITS, "present_key_names": PRESENT_KEY, "present_value_names": PRESENT_VALUE},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": facts["context_length"],
                   "min_length": 0, "temperature": 1.0, "top_k": 1, "top_p": 1.0, "repetition_penalty": 1.0,
                   "length_penalty": 1.0, "no_repeat_ngram_size": 0, "early_stopping": True,
                   "past_present_share_buffer": False},
    }


def write_genai_config(directory: Path, proto, facts: dict[str, Any], model_file: str,
                       quant_bits: int | None = None) -> str | None:
    """Write ``genai_config.json``; returns None, or why onnxruntime-genai cannot run this graph (nothing written)."""
    try:
        config = genai_config(proto, facts, model_file, quant_bits)
    except GenaiUnsupported as err:
        return str(err)
    (directory / GENAI_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return None


def check_genai_config(config: object, proto, facts: dict[str, Any], model_file: str) -> list[str]:
    """What in a ``genai_config.json`` disagrees with the graph and the manifest facts (empty: it fits)."""
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict) \
            or not isinstance(config["model"].get("decoder"), dict):
        return ["it needs a 'model' object with a 'decoder' object"]
    model, decoder = config["model"], config["model"]["decoder"]
    inputs, outputs = _dims(proto.graph.input), _dims(proto.graph.output)
    problems = []
    layers = decoder.get("num_hidden_layers")
    if layers != facts["layers"]:
        problems.append(f"model.decoder.num_hidden_layers is {layers!r}; the graph has {facts['layers']} cache layers")
        layers = facts["layers"]
    if decoder.get("filename") != model_file:
        problems.append(f"model.decoder.filename is {decoder.get('filename')!r}; the model file is {model_file!r}")
    names_in, names_out = decoder.get("inputs") or {}, decoder.get("outputs") or {}
    for field, want in zip(("input_ids", "attention_mask", "position_ids"), DECODER_INPUTS):
        if names_in.get(field) not in inputs:
            problems.append(f"model.decoder.inputs.{field} is {names_in.get(field)!r}, not a graph input ({want!r} is)")
    if names_out.get("logits") not in outputs:
        problems.append(f"model.decoder.outputs.logits is {names_out.get('logits')!r}, not a graph output")
    for where, table, fields, graph_names in (
            ("inputs", names_in, ("past_key_names", "past_value_names"), past_names(layers)),
            ("outputs", names_out, ("present_key_names", "present_value_names"), present_names(layers))):
        for part, field in enumerate(fields):
            pattern = table.get(field)
            want = graph_names[part::2]
            got = [pattern % i for i in range(layers)] if isinstance(pattern, str) and pattern.count("%d") == 1 else []
            if got != want:
                problems.append(f"model.decoder.{where}.{field} is {pattern!r}; the graph's names are {want[0]!r}...")
    try:
        heads, head_size = cache_shape(proto, facts["layers"])
    except GenaiUnsupported as err:
        return problems + [str(err)]
    for field, want in (("num_key_value_heads", heads), ("head_size", head_size)):
        if decoder.get(field) != want:
            problems.append(f"model.decoder.{field} is {decoder.get(field)!r}; the graph's cache has {want}")
    vocab = outputs.get(LOGITS, [None, None, None])[2]
    if isinstance(vocab, int) and model.get("vocab_size") != vocab:
        problems.append(f"model.vocab_size is {model.get('vocab_size')!r}; the logits have {vocab}")
    context = facts.get("context_length")
    if context and model.get("context_length") != context:
        problems.append(f"model.context_length is {model.get('context_length')!r}; the model has {context} positions")
    eos = model.get("eos_token_id")
    if sorted(eos if isinstance(eos, list) else [eos]) != sorted(facts.get("eos_token_id") or []):
        problems.append(f"model.eos_token_id is {eos!r}; the model config says {facts.get('eos_token_id')}")
    size = model.get("vocab_size")
    for field in ("eos_token_id", "bos_token_id", "pad_token_id"):
        ids = model.get(field)
        for i in ids if isinstance(ids, list) else [ids]:
            if isinstance(size, int) and (not isinstance(i, int) or not 0 <= i < size):
                problems.append(f"model.{field} {i!r} is not a token id below model.vocab_size {size}")
    if (config.get("search") or {}).get("past_present_share_buffer"):
        problems.append("search.past_present_share_buffer is true; this graph concatenates its cache, so it must be "
                        "false")
    return problems
