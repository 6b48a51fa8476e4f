"""Export a LoRA model to ONNX with switchable adapters (or one adapter folded in).

``OUT/model.onnx`` takes every adapter weight as an input named by ``adapters.onnx_input_names``
(``<path>.lora_A.weight`` [in, lora_r], ``<path>.lora_B.weight`` [lora_r, out], scale baked into
B), each with a same-named rank-0 default initializer: feed nothing and it is the base model.
``OUT/adapters/<name>.onnx_adapter`` holds each adapter in ONNX Runtime's own format, and
``OUT/manifest.json`` lists inputs, outputs, adapters, opset and the source model.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from surgeon.adapters import check_name, onnx_input_names
from surgeon.checkpoint import copy_tokenizer_files
from surgeon.outputs import write_dir_atomically
from surgeon.errors import AdapterError
from surgeon.layers import LoraLayer
from surgeon.passes.fold import fold
from surgeon.onnx.runtime import file_digest
from surgeon.passes.inputs import InputFeed, LoraInput, adapter_tensors, lora_as_inputs

MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
ADAPTER_DIR = "adapters"
ADAPTER_SUFFIX = ".onnx_adapter"
EXTERNAL_DATA_BYTES = 1 << 30  # above this much weight, write model.onnx.data beside model.onnx


class _Wrapper(nn.Module):
    """``(input names..., *lora tensors) -> logits`` around an input-fed graph."""

    def __init__(self, graph, names: tuple[str, ...], loras: tuple[LoraInput, ...], feed: InputFeed, consts: dict):
        super().__init__()
        self.body, self.names, self.loras, self.feed, self.consts = graph, names, loras, feed, consts

    def forward(self, *args):
        inputs = dict(zip(self.names, args[: len(self.names)]))
        flat = args[len(self.names):]
        self.feed.tensors = {lo.path: (flat[2 * i], flat[2 * i + 1]) for i, lo in enumerate(self.loras)}
        return self.body(**inputs, **self.consts).logits


class _DecoderWrapper(nn.Module):
    """``(input_ids, attention_mask, position_ids, *past, *lora tensors) -> (logits, *presents)``."""

    def __init__(self, graph, n_past: int, loras: tuple[LoraInput, ...], feed: InputFeed):
        super().__init__()
        self.body, self.n_past, self.loras, self.feed = graph, n_past, loras, feed

    def forward(self, *args):
        input_ids, attention_mask, position_ids = args[:3]
        past, flat = list(args[3: 3 + self.n_past]), args[3 + self.n_past:]
        self.feed.tensors = {lo.path: (flat[2 * i], flat[2 * i + 1]) for i, lo in enumerate(self.loras)}
        logits, presents = self.body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                     past=past)
        return (logits, *presents)


def past_names(layers: int) -> list[str]:
    """``past_key_values.{i}.key`` / ``.value`` (the names optimum and onnxruntime-genai use)."""
    return [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def present_names(layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def export_onnx(model, out_dir: str | os.PathLike, adapters: list[str] | None = None, *, merged: bool = False,
                force: bool = False, source: str | None = None, opset: int | None = None,
                adapter_names: dict[str, str] | None = None, adapter_sources: dict[str, str] | None = None,
                kv_cache: bool = False, _quantize: dict | None = None, _merge_recipe: dict | None = None) -> Path:
    """Write ``out_dir`` for a ``SurgeonModel``: switchable adapters, or ``merged=True`` for one folded adapter.

    ``kv_cache=True`` exports the decoder with the KV cache as inputs and outputs (prefill and decode in one model).
    """
    names = list(adapters or model.peft_config)
    for name in names:
        model._known(name)
        check_name((adapter_names or {}).get(name, name), "adapter name (its .onnx_adapter file name)")
    from surgeon.quant import QuantizationError, dequantized_view, quant_bits

    bits = quant_bits(model.base)
    if bits and merged:
        raise QuantizationError("--merged with a 4/8-bit base is not supported: fold the adapter into a float "
                                "checkpoint (surgeon fold MODEL ADAPTER --bits N -o MERGED) and export that")
    if bits:  # export the dequantized graph, then ONNX Runtime's MatMulNBits replaces the base matmuls
        with dequantized_view(model) as layers:
            return export_onnx(model, out_dir, adapters, force=force, source=source, opset=opset,
                               adapter_names=adapter_names, adapter_sources=adapter_sources, kv_cache=kv_cache,
                               _quantize=layers)
    if merged and len(names) != 1:
        raise AdapterError(f"--merged folds exactly one adapter; got {len(names)} ({', '.join(names)})")
    model.eval()
    layout = None
    if kv_cache:
        graph, layout = model.decoder_graph()
        call = None
    else:
        call = _default_call(model)
        graph = model.graph_for(**call)

    def run_export(g, feed):
        if kv_cache:
            return _export_decoder(g, model, layout, feed=feed, opset=opset)
        return _export(g, model, call, feed=feed, opset=opset)

    def fill(tmp: Path) -> None:
        if merged:
            active = model.active_adapter
            model.set_adapter(names[0])
            try:
                program, loras = run_export(fold(graph), None)
            finally:
                model.set_adapter(active)
        else:
            program, loras = run_export(graph, InputFeed())
        _save(program, tmp / MODEL_FILE, loras, model, kv_layers=layout.layers if layout else 0)
        quantized = None
        if _quantize:
            from surgeon.quant import quantize_onnx_matmuls

            quantized = quantize_onnx_matmuls(tmp / MODEL_FILE, _quantize)
        written = {} if merged else write_adapters(model, names, loras, tmp / ADAPTER_DIR, adapter_names or {})
        copied = copy_tokenizer_files(source_dir(source), tmp) if source_dir(source) else []
        sources = {(adapter_names or {}).get(k, k): str(Path(v).resolve()) for k, v in (adapter_sources or {}).items()}
        extra = {"merged_source": sources.get(names[0])} if merged else {"adapter_sources": sources}
        if _merge_recipe:  # a weighted merge of several adapters (fold): what check rebuilds the reference from
            extra["merge_recipe"] = _merge_recipe
        if layout is not None:
            extra["generation"] = generation_facts(model, layout)
        if quantized:
            extra["quantization"] = quantized
        write_manifest(tmp, model, loras, written, merged=names[0] if merged else None, source=source,
                       tokenizer=bool(copied), kv_cache=layout is not None, extra=extra)

    inputs = [source_dir(source), *(adapter_sources or {}).values()]
    return write_dir_atomically(out_dir, fill, force=force, inputs=inputs)


def source_dir(source: str | None) -> Path | None:
    """The directory of a source model (a path or a built-in name), if there is one."""
    from surgeon.errors import ModelNotFoundError
    from surgeon.hub import model_dir

    if not source:
        return None
    try:
        return model_dir(source)
    except ModelNotFoundError:
        return None


def _default_call(model) -> dict[str, Any]:
    from surgeon.capturing import example_inputs

    return example_inputs(model.base)


def _export(graph, model, call: dict[str, Any], *, feed: InputFeed | None, opset: int | None):
    names = tuple(k for k, v in call.items() if isinstance(v, torch.Tensor))
    consts = {k: v for k, v in call.items() if not isinstance(v, torch.Tensor)}
    loras: tuple[LoraInput, ...] = ()
    if feed is not None:
        graph, loras = lora_as_inputs(graph, feed)
    graph.eval()
    wrapper = _Wrapper(graph, names, loras, feed or InputFeed(), consts).eval()
    batch, seq = Dim("batch"), Dim("sequence")
    args, shapes = [call[n] for n in names], [{0: batch, 1: seq} for _ in names]
    for i, lo in enumerate(loras):
        rank = Dim(f"lora_r_{i}")
        args += [torch.zeros(lo.in_features, 2), torch.zeros(2, lo.out_features)]
        shapes += [{1: rank}, {0: rank}]
    input_names = list(names) + [n for lo in loras for n in onnx_input_names(lo.path)]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, tuple(args), dynamic_shapes=(tuple(shapes),), input_names=input_names,
                                    output_names=["logits"], dynamo=True, opset_version=opset, verbose=False,
                                    optimize=True)
    return program, loras


def _export_decoder(graph, model, layout, *, feed: InputFeed | None, opset: int | None):
    from surgeon.generation import decode_example

    loras: tuple[LoraInput, ...] = ()
    if feed is not None:
        graph, loras = lora_as_inputs(graph, feed)
    graph.eval()
    n_past = 2 * layout.layers
    wrapper = _DecoderWrapper(graph, n_past, loras, feed or InputFeed()).eval()
    example = decode_example(model.base, layout)
    batch, seq, past = Dim("batch"), Dim("sequence"), Dim("past_sequence")
    args = [example["input_ids"], example["attention_mask"], example["position_ids"], *example["past"]]
    shapes = [{0: batch, 1: seq}, {0: batch, 1: Dim.AUTO}, {0: batch, 1: seq}] + [{0: batch, 2: past}] * n_past
    for i, lo in enumerate(loras):
        rank = Dim(f"lora_r_{i}")
        args += [torch.zeros(lo.in_features, 2), torch.zeros(2, lo.out_features)]
        shapes += [{1: rank}, {0: rank}]
    input_names = ["input_ids", "attention_mask", "position_ids", *past_names(layout.layers)]
    input_names += [n for lo in loras for n in onnx_input_names(lo.path)]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, tuple(args), dynamic_shapes=(tuple(shapes),), input_names=input_names,
                                    output_names=["logits", *present_names(layout.layers)], dynamo=True,
                                    opset_version=opset, verbose=False, optimize=True)
    return program, loras


def generation_facts(model, layout) -> dict[str, Any]:
    """What ``AdapterSession.generate`` needs besides the graph: cache shapes, special tokens, context length."""
    config = model.base.config
    gen = getattr(model.base, "generation_config", None)

    def ids(value):
        if value is None:
            return []
        return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]

    eos = ids(getattr(gen, "eos_token_id", None)) or ids(getattr(config, "eos_token_id", None))
    pad = ids(getattr(gen, "pad_token_id", None)) or ids(getattr(config, "pad_token_id", None))
    from surgeon.generation import context_length

    context = context_length(model.base)
    return {"layers": layout.layers, "kv_heads": list(layout.key_heads), "key_dim": list(layout.key_dims),
            "value_dim": list(layout.value_dims), "cache_dtype": str(layout.dtype).removeprefix("torch."),
            "eos_token_id": eos, "pad_token_id": pad[0] if pad else None, "context_length": context,
            "vocab_size": int(getattr(config, "vocab_size", 0) or 0) or None}


def _save(program, path: Path, loras: tuple[LoraInput, ...], model, kv_layers: int = 0) -> None:
    """Save, then name the rank dims ``lora_r`` (and the cache dims) and add the rank-0 default initializers."""
    import onnx
    from onnx import TensorProto, helper

    weight_bytes = sum(p.numel() * p.element_size() for p in model.base.parameters())
    external = weight_bytes > EXTERNAL_DATA_BYTES
    program.save(str(path), external_data=external)
    proto = onnx.load(str(path), load_external_data=False)
    lora_names = {n for lo in loras for n in onnx_input_names(lo.path)}
    for value in proto.graph.input:
        if value.name in lora_names:
            for dim in value.type.tensor_type.shape.dim:
                if dim.dim_param:
                    dim.dim_param = "lora_r"
    if kv_layers:
        _name_cache_dims(proto, kv_layers)
    for lo in loras:
        name_a, name_b = onnx_input_names(lo.path)
        proto.graph.initializer.append(helper.make_tensor(name_a, TensorProto.FLOAT, [lo.in_features, 0], []))
        proto.graph.initializer.append(helper.make_tensor(name_b, TensorProto.FLOAT, [0, lo.out_features], []))
    onnx.save(proto, str(path))


def _name_cache_dims(proto, layers: int) -> None:
    """Readable dims: ``total_sequence`` for the mask's length and the presents' length, ``vocab`` unchanged."""
    values = {v.name: v for v in list(proto.graph.input) + list(proto.graph.output)}

    def name(value_name: str, axis: int, label: str) -> None:
        dim = values[value_name].type.tensor_type.shape.dim[axis]
        dim.ClearField("dim_value")
        dim.dim_param = label

    name("attention_mask", 1, "total_sequence")
    name("logits", 0, "batch")
    name("logits", 1, "sequence")
    for n in present_names(layers):
        name(n, 0, "batch")
        name(n, 2, "total_sequence")


def write_adapters(model, names: list[str], loras: tuple[LoraInput, ...], directory: Path,
                   rename: dict[str, str]) -> dict[str, dict]:
    """One ``.onnx_adapter`` per adapter (ONNX Runtime's format); returns manifest entries."""
    import onnxruntime as ort

    directory.mkdir(parents=True, exist_ok=True)
    layers = {m.path: m for m in model._registry().values() if isinstance(m, LoraLayer)}
    written = {}
    for name in names:
        params, targets, ranks = {}, [], set()
        for lo in loras:
            layer = layers[lo.path]
            if name not in layer.adapters:
                continue  # that module keeps its rank-0 default: no change there
            a, b = adapter_tensors(layer, name)
            name_a, name_b = onnx_input_names(lo.path)
            params[name_a] = ort.OrtValue.ortvalue_from_numpy(a.numpy())
            params[name_b] = ort.OrtValue.ortvalue_from_numpy(b.numpy())
            targets.append(lo.path)
            ranks.add(a.shape[1])
        file_name = rename.get(name, name) + ADAPTER_SUFFIX
        fmt = ort.AdapterFormat()
        fmt.set_adapter_version(1)
        fmt.set_model_version(1)
        fmt.set_parameters(params)
        fmt.export_adapter(str(directory / file_name))
        written[rename.get(name, name)] = {"file": f"{ADAPTER_DIR}/{file_name}", "targets": targets, "ranks": sorted(ranks),
                                           "config": model.peft_config[name].to_peft_dict()}
    return written


def write_manifest(directory: Path, model, loras, adapters: dict, *, merged: str | None, source: str | None,
                   tokenizer: bool, kv_cache: bool, extra: dict | None = None) -> None:
    import onnx

    proto = onnx.load(str(directory / MODEL_FILE), load_external_data=False)

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            out.append({"name": v.name, "dtype": onnx.TensorProto.DataType.Name(t.elem_type).lower(),
                        "shape": [d.dim_param or d.dim_value for d in t.shape.dim]})
        return out

    lora_names = {n for lo in loras for n in onnx_input_names(lo.path)}
    manifest = {
        "format": "surgeon-onnx/1",
        "model": MODEL_FILE,
        "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
        "source": {"model": source, "class": type(model.base).__name__,
                   "model_type": getattr(model.base.config, "model_type", None)},
        "inputs": [v for v in describe(proto.graph.input) if v["name"] not in lora_names],
        "outputs": describe(proto.graph.output),
        "lora_inputs": [{"path": lo.path, "kind": lo.kind, "in": lo.in_features, "out": lo.out_features,
                         "a": onnx_input_names(lo.path)[0], "b": onnx_input_names(lo.path)[1]} for lo in loras],
        "adapters": adapters,
        "merged_adapter": merged,
        "kv_cache": kv_cache,
        "tokenizer": tokenizer,
        **(extra or {}),
        "files": {p.relative_to(directory).as_posix(): file_digest(p) for p in sorted(directory.rglob("*"))
                  if p.is_file() and p.name != MANIFEST},
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
