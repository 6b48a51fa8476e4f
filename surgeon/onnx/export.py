"""Export a LoRA model to ONNX with switchable adapters (or one adapter folded in).

``OUT/model.onnx`` takes every adapter weight as an input named by ``names.onnx_input_names``
(``<path>.lora_A.weight`` [in, lora_r], ``<path>.lora_B.weight`` [lora_r, out], scale baked into
B), each with a same-named rank-0 default initializer: feed nothing and it is the base model.
``OUT/adapters/<name>.onnx_adapter`` holds each adapter in ONNX Runtime's own format, and
``OUT/manifest.json`` lists inputs, outputs, adapters, opset, the sources and a sha256 per file. Beside them: the
source's ``config.json`` (and ``generation_config.json``) and tokenizer files, so optimum and transformers open the
directory; with the KV cache, ``OUT/genai_config.json`` for onnxruntime-genai.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn
from torch.export import Dim

from surgeon.adapters import check_name
from surgeon.capturing import example_inputs
from surgeon.capturing.decoder import decode_example
from surgeon.errors import AdapterError, ModelNotFoundError, QuantizationError
from surgeon.hub import copy_tokenizer_files, model_dir, write_model_config
from surgeon.names import (ADAPTER_IDS, DECODER_INPUTS, GENAI_CONFIG, LOGITS, MODEL_FILE, PROMPT_KEY, past_names,
                           present_names)
from surgeon.onnx.genai import write_genai_config
from surgeon.onnx.prompt import add_prompt_input
from surgeon.onnx.int4 import Int4Spec, quantize_int4
from surgeon.onnx.writing import generation_facts, save_model, write_adapters, write_bank, write_manifest
from surgeon.outputs import write_dir_atomically
from surgeon.passes.fold import fold
from surgeon.passes.inputs import InputFeed, LoraInput, lora_as_inputs
from surgeon.quant import quant_bits
from surgeon.quant.to_onnx import TRANSLATION, export_facts, finish



class _Wrapper(nn.Module):
    """``(graph inputs..., *lora tensors) -> outputs`` around an input-fed graph: the call torch.onnx exports."""

    def __init__(self, graph, names: tuple[str, ...], loras: tuple[LoraInput, ...], feed: InputFeed, consts: dict,
                 decoder: bool, bank: bool = False):
        super().__init__()
        self.body, self.names, self.loras, self.feed, self.consts, self.decoder = graph, names, loras, feed, consts, decoder
        self.bank = bank

    def forward(self, *args):
        n = len(self.names)
        flat = args[n:]
        if self.bank:
            self.feed.ids, flat = flat[0], flat[1:]
        self.feed.tensors, at = {}, 0
        for lo in self.loras:
            self.feed.tensors[lo.path], at = tuple(flat[at: at + len(lo.names)]), at + len(lo.names)
        if not self.decoder:
            return self.body(**dict(zip(self.names, args[:n])), **self.consts).logits
        ids, mask, positions, *past = args[:n]
        logits, presents = self.body(input_ids=ids, attention_mask=mask, position_ids=positions, past=past)
        return (logits, *presents)


def export_onnx(model, out_dir: str | os.PathLike, adapters: list[str] | None = None, *, merged: bool = False,
                force: bool = False, source: str | None = None, opset: int | None = None,
                adapter_names: dict[str, str] | None = None, adapter_sources: dict[str, str] | None = None,
                kv_cache: bool = False, merge_recipe: dict | None = None, bank: bool = False,
                int4: Int4Spec | None = None) -> Path:
    """Write ``out_dir`` for a ``SurgeonModel``: switchable adapters, or ``merged=True`` for one folded adapter.

    ``kv_cache=True`` exports the decoder with the KV cache as inputs and outputs (prefill and decode in one model).
    ``bank=True``: an adapter bank, where each row of a batch picks its adapter through the ``adapter_ids`` input
    (``adapters/bank.onnx_adapter`` holds every adapter, slot 0 the base; each adapter's own file still works alone).
    ``adapter_sources`` (name -> PEFT directory) and ``merge_recipe`` are recorded for ``surgeon check``.
    ``int4``: the base's linears and head as ``MatMulNBits`` (``surgeon.onnx.int4``); adapters stay float inputs
    (with ``merged=True`` the folded weights are quantized).
    """
    names = list(adapters or model.peft_config)
    rename = adapter_names or {}
    for name in names:
        model.adapter_state.known(name)
        check_name(rename.get(name, name), "adapter name (its .onnx_adapter file name)")
    if bank and "bank" in [rename.get(n, n) for n in names]:
        raise AdapterError("an adapter bank writes adapters/bank.onnx_adapter: rename the adapter called 'bank'")
    if merged and bank:
        raise AdapterError("--merged and --bank exclude each other: a bank keeps every adapter switchable per row")
    if merged and len(names) != 1:
        raise AdapterError(f"--merged folds exactly one adapter; got {len(names)} ({', '.join(names)})")
    prompts = [rename.get(n, n) for n in names if model.peft_config[n].peft_type == "PROMPT_TUNING"]
    if prompts and (merged or bank or int4):
        raise AdapterError(f"prompt-tuning adapters ({', '.join(prompts)}) export switchable only: their virtual "
                           "tokens are an input, with nothing to merge; drop --merged / --bank / --int4")
    ia3 = [rename.get(n, n) for n in names if model.peft_config[n].peft_type == "IA3"]
    if ia3 and int4 and not merged:
        raise AdapterError(f"--int4 with IA3 adapters ({', '.join(ia3)}) is not supported yet: export them without "
                           "it (each switches per run), or --merged --int4")
    dora = [rename.get(n, n) for n in names if model.peft_config[n].use_dora]
    if dora and int4 and not merged:
        raise AdapterError(f"--int4 with switchable DoRA adapters ({', '.join(dora)}) is not supported yet: their "
                           "scale is taken against the float weight; export with --merged --int4 instead")
    bits = quant_bits(model.base)
    if bits and merged:
        raise QuantizationError("--merged with a 4/8-bit base is not supported: fold the adapter into a float "
                                "checkpoint (surgeon fold MODEL ADAPTER --bits N -o MERGED) and export that")
    if bits and int4:
        raise QuantizationError(f"--int4 on a {bits}-bit base: it is quantized already (export it without --int4)")
    sources = {rename.get(k, k): str(Path(v).resolve()) for k, v in (adapter_sources or {}).items()}
    extra: dict[str, Any] = {"merged_source": sources.get(rename.get(names[0], names[0]))} if merged else \
        {"adapter_sources": sources}
    if merge_recipe:  # a weighted merge of several adapters (fold): what check rebuilds the reference from
        extra["merge_recipe"] = merge_recipe

    def fill(tmp: Path) -> None:
        model.eval()
        loras, layout = _write_model(model, tmp, names, merged, kv_cache, opset, bank)
        if bits:
            extra["quantization"] = export_facts(model.base)
        if int4:
            extra["int4"] = quantize_int4(tmp / MODEL_FILE, int4, {n for lo in loras for n in lo.names},
                                          _linear_weights(model.base))
        if prompts:  # the virtual tokens as an input of the base graph (surgeon.onnx.prompt)
            proto = onnx.load(str(tmp / MODEL_FILE), load_external_data=False)
            add_prompt_input(proto)
            onnx.save(proto, str(tmp / MODEL_FILE))
            extra["prompt"] = {"input": PROMPT_KEY, "tokens": {rename.get(n, n): model.peft_config[n].num_virtual_tokens
                                                               for n in names}}
        written = {} if merged else write_adapters(model, names, loras, tmp, rename, bank=bank)
        if bank:
            extra["bank"] = write_bank(model, names, loras, tmp, rename)
        src = _source_dir(source)
        copied = copy_tokenizer_files(src, tmp) if src else []
        write_model_config(model.base, src, tmp)
        if layout is not None:
            extra["generation"] = generation_facts(model.base, layout)
            proto = onnx.load(str(tmp / MODEL_FILE), load_external_data=False)
            why = "prompt tuning: onnxruntime-genai would feed the virtual tokens at every step and leave them out of " \
                "its position ids" if prompts else write_genai_config(tmp, proto, extra["generation"], MODEL_FILE, bits)
            extra["genai"] = {"config": GENAI_CONFIG} if why is None else {"config": None, "why": why}
        write_manifest(tmp, model, loras, written, merged=rename.get(names[0], names[0]) if merged else None,
                       source=source, tokenizer=bool(copied), kv_cache=kv_cache, extra=extra)

    return write_dir_atomically(out_dir, fill, force=force, inputs=[_source_dir(source), *(adapter_sources or {}).values()])


def _linear_weights(base: nn.Module) -> dict[str, tuple[str, str]]:
    """Every name of a linear layer's weight (a tied head's embedding name too) -> (the linear's weight name, its
    layout: ``out_in`` for ``nn.Linear``, ``in_out`` for GPT-2's Conv1D)."""
    linear = {f"{path}.weight": "in_out" if type(m).__name__ == "Conv1D" else "out_in"
              for path, m in base.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}
    groups: dict[int, list[str]] = {}
    for name, p in base.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    out = {}
    for names in groups.values():
        target = next((n for n in names if n in linear), None)
        out.update({n: (target, linear[target]) for n in names} if target else {})
    return out


def _source_dir(source: str | None) -> Path | None:
    """The directory of a source model (a path or a built-in name), if there is one."""
    try:
        return model_dir(source) if source else None
    except ModelNotFoundError:
        return None


def _write_model(model, tmp: Path, names: list[str], merged: bool, kv_cache: bool, opset: int | None,
                 bank: bool = False):
    """Export the graph (folded, or with adapter inputs) to ``tmp/model.onnx``; returns the adapter inputs and the
    cache layout (None without KV cache)."""
    if kv_cache:
        graph, layout = model.decoder_graph()
        example = decode_example(model.base, layout)
        call = {"input_ids": example["input_ids"], "attention_mask": example["attention_mask"],
                "position_ids": example["position_ids"]}
    else:
        layout, call = None, example_inputs(model.base)
        graph = model.graph_for(**call)
    feed = None if merged else InputFeed()
    if merged:
        active = model.active_adapter
        model.set_adapter(names[0])
        try:
            graph = fold(graph)
        finally:
            model.set_adapter(active)
    program, loras = _to_onnx(graph, call, feed, example["past"] if kv_cache else None, layout, opset, bank)
    save_model(program, tmp / MODEL_FILE, loras, model.base, kv_layers=layout.layers if layout else 0, bank=bank)
    return loras, layout


def _to_onnx(graph, call: dict[str, Any], feed: InputFeed | None, past: list | None, layout, opset: int | None,
             bank: bool = False):
    """torch.onnx (dynamo) export of the graph with named inputs, dynamic batch / sequence / rank dims."""
    names = tuple(k for k, v in call.items() if isinstance(v, torch.Tensor))
    consts = {k: v for k, v in call.items() if not isinstance(v, torch.Tensor)}
    loras: tuple[LoraInput, ...] = ()
    if feed is not None:
        graph, loras = lora_as_inputs(graph, feed)
    graph.eval()
    batch, seq = Dim("batch"), Dim("sequence")
    args, shapes = [call[n] for n in names], [{0: batch, 1: seq} for _ in names]
    input_names, output_names = list(names), [LOGITS]
    if past is not None:  # decoder: the mask spans past + new positions; the cache grows along dim 2
        assert names == DECODER_INPUTS, names
        shapes[1] = {0: batch, 1: Dim.AUTO}
        names += tuple(past_names(layout.layers))
        args += past
        shapes += [{0: batch, 2: Dim("past_sequence")}] * len(past)
        input_names += past_names(layout.layers)
        output_names += present_names(layout.layers)
    if bank:  # each row's slot; the example batch uses slots 0 and 1 of a two-slot bank
        args.append(torch.arange(call[names[0]].shape[0]) % 2)
        shapes.append({0: batch})
        input_names.append(ADAPTER_IDS)
    slots = Dim("adapter_slots")
    for i, lo in enumerate(loras):
        rank = Dim(f"lora_r_{i}")
        if lo.ia3:  # one vector, default ones (a bank: one per slot)
            args.append(torch.ones(2, lo.ia3_size) if bank else torch.ones(lo.ia3_size))
            shapes.append({0: slots} if bank else {})
            input_names += lo.names
            continue
        if bank:
            args += [torch.zeros(2, lo.in_features, 2), torch.zeros(2, 2, lo.out_features)]
            shapes += [{0: slots, 2: rank}, {0: slots, 1: rank}]
        else:
            args += [torch.zeros(lo.in_features, 2), torch.zeros(2, lo.out_features)]
            shapes += [{1: rank}, {0: rank}]
        if lo.dora:
            args.append(torch.ones(2, lo.out_features) if bank else torch.ones(lo.out_features))
            shapes.append({0: slots} if bank else {})
        input_names += lo.names
    wrapper = _Wrapper(graph, tuple(input_names[: len(names)]), loras, feed or InputFeed(), consts, past is not None,
                       bank)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper.eval(), tuple(args), dynamic_shapes=(tuple(shapes),), input_names=input_names,
                                    output_names=output_names, dynamo=True, opset_version=opset, verbose=False,
                                    optimize=True, custom_translation_table=TRANSLATION)
    finish(program.model)  # a quantized base: its packed weights become initializers (a float base: nothing to do)
    return program, loras
