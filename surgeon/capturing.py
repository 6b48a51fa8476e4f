"""Capture: ``torch.export`` a module for one call signature into a plain ``fx.GraphModule``.

The graph shares the eager model's parameters (no copy), has dynamic batch and sequence
dims, and turns every dropout into a small module that reads ``self.training`` so that
``.train()`` / ``.eval()`` keep working. Example inputs are synthesised from the model's
config when none are given. Graphs are cached per (model, signature).
"""

from __future__ import annotations

import dataclasses
import traceback
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim

from surgeon.errors import CaptureError

ATEN = torch.ops.aten
SUPPORTED_KINDS = ("linear", "conv1d", "embedding")


@dataclasses.dataclass(frozen=True)
class ModuleInfo:
    """What matching needs to know about one module of the eager model."""

    path: str
    type_name: str
    kind: str | None  # "linear", "conv1d", "embedding", or None when LoRA cannot wrap it
    in_features: int = 0
    out_features: int = 0


@dataclasses.dataclass(frozen=True)
class CaptureInfo:
    """Facts about the source model, stored on a captured graph as ``graph.meta["surgeon"]``."""

    signature: tuple
    modules: Mapping[str, ModuleInfo]
    output_embedding: str | None
    model_type: str | None
    model_class: str


def describe_module(path: str, module: nn.Module) -> ModuleInfo:
    type_name = type(module).__name__
    if type_name == "QuantLinear":  # surgeon.quant: a frozen quantized linear, one op in the graph
        return ModuleInfo(path, type_name, "linear", module.in_features, module.out_features)
    if isinstance(module, nn.Linear):
        return ModuleInfo(path, type_name, "linear", module.in_features, module.out_features)
    if type_name == "Conv1D" and hasattr(module, "nf"):  # GPT-2's transposed linear, weight [in, out]
        return ModuleInfo(path, type_name, "conv1d", module.weight.shape[0], module.weight.shape[1])
    if isinstance(module, nn.Embedding):
        return ModuleInfo(path, type_name, "embedding", module.num_embeddings, module.embedding_dim)
    return ModuleInfo(path, type_name, None)


def module_table(model: nn.Module) -> dict[str, ModuleInfo]:
    return {path: describe_module(path, m) for path, m in model.named_modules() if path}


def signature_of(kwargs: Mapping[str, Any]) -> tuple:
    """Hashable key of a call: tensor names with rank and dtype kind, other values as given."""
    items = []
    for key in sorted(kwargs):
        value = kwargs[key]
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            items.append((key, "tensor", value.dim(), value.is_floating_point()))
        else:
            items.append((key, "const", value))
    return tuple(items)


# ---- example inputs ---------------------------------------------------------------------
EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 8


def example_inputs(model: nn.Module, like: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Inputs for capture with batch 2 and sequence 8 (sizes export can keep symbolic).

    ``like`` gives the names (and dtypes, ranks) of a real call; default: input_ids + attention_mask.
    """
    config = getattr(model, "config", None)
    vocab = int(getattr(config, "vocab_size", 0) or 2)
    like = dict(like) if like else default_call(model)
    g = torch.Generator().manual_seed(0)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    out: dict[str, Any] = {}
    for key, value in like.items():
        if not isinstance(value, torch.Tensor) and value is not None:
            out[key] = value
            continue
        shape = (EXAMPLE_BATCH, EXAMPLE_SEQ)
        if key in ("input_ids", "decoder_input_ids"):
            t = torch.randint(min(4, vocab - 1), vocab, shape, generator=g)
        elif key == "attention_mask":
            t = torch.ones(shape, dtype=torch.long)
        elif key == "position_ids":
            t = torch.arange(EXAMPLE_SEQ).expand(shape).contiguous()
        elif key == "token_type_ids":
            t = torch.zeros(shape, dtype=torch.long)
        elif key == "inputs_embeds":
            t = torch.randn(*shape, value.shape[-1], generator=g, dtype=value.dtype)
        elif isinstance(value, torch.Tensor):
            t = torch.zeros((EXAMPLE_BATCH, EXAMPLE_SEQ, *value.shape[2:])[: value.dim()], dtype=value.dtype)
        else:
            continue
        if isinstance(value, torch.Tensor) and key != "inputs_embeds":
            t = t.to(value.dtype)
        out[key] = t.to(device)
    return out


def accepts(model: nn.Module, name: str) -> bool:
    import inspect

    return name in inspect.signature(model.forward).parameters


def default_call(model: nn.Module) -> dict[str, Any]:
    """The plain training call: ids and mask (token types where used), no KV cache."""
    call: dict[str, Any] = {"input_ids": None, "attention_mask": None}
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        call["decoder_input_ids"] = None
    if accepts(model, "use_cache"):
        call["use_cache"] = False
    return call


def _dynamic_shapes(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            spec[key] = {i: Dim.AUTO for i in range(min(value.dim(), 2))}
        else:
            spec[key] = None
    return spec


# ---- capture ------------------------------------------------------------------------------
def capture(model: nn.Module, example: Mapping[str, Any] | None = None, *, cache: bool = True) -> fx.GraphModule:
    """Export ``model`` for the call signature of ``example`` (synthesised when None).

    Returns a plain ``fx.GraphModule`` whose parameters are the model's own tensors, whose
    dropouts follow ``.train()``/``.eval()``, and whose ``meta["surgeon"]`` is a ``CaptureInfo``.
    """
    kwargs = example_inputs(model, example)
    sig = signature_of(kwargs)
    per_model = _CACHE.setdefault(model, {}) if cache else {}
    key = (sig, _fingerprint(model))
    if key not in per_model:
        per_model[key] = _export(model, kwargs, sig)
    return _fresh_copy(per_model[key], train=model.training)


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fingerprint(model: nn.Module) -> tuple:
    return tuple((n, id(p), tuple(p.shape), p.dtype) for n, p in model.named_parameters(remove_duplicate=False))


def _fresh_copy(gm: fx.GraphModule, *, train: bool) -> fx.GraphModule:
    from surgeon.passes.graph_copy import copy_graph

    new = copy_graph(gm)
    new.train(train)
    return new


def capture_decoder(model: nn.Module, *, cache: bool = True) -> tuple[fx.GraphModule, Any]:
    """Export ``model`` (a ``*ForCausalLM``) for the decode signature of ``surgeon.generation``.

    The graph is called as ``graph(input_ids=, attention_mask=, position_ids=, past=[k0, v0, ...])``
    and returns ``(logits, presents)``; ``past`` may have length 0 (prefill). Returns the graph and
    the ``CacheLayout``.
    """
    from surgeon.generation import DECODE_KEY, cache_layout, decode_example, decode_forward, forward_as

    layout = cache_layout(model)
    kwargs = decode_example(model, layout)
    per_model = _CACHE.setdefault(model, {}) if cache else {}
    key = (DECODE_KEY, _fingerprint(model))
    if key not in per_model:
        shapes = {"input_ids": {0: Dim.AUTO, 1: Dim.AUTO}, "attention_mask": {0: Dim.AUTO, 1: Dim.AUTO},
                  "position_ids": {0: Dim.AUTO, 1: Dim.AUTO}, "past": [{0: Dim.AUTO, 2: Dim.AUTO} for _ in kwargs["past"]]}
        with forward_as(model, decode_forward(model)):
            # No input guards: export assumes sizes >= 2 (so total >= 4), but the graph is generic; prefill runs
            # with past 0 and decode with sequence 1 (tested down to one-token prompts, against eager transformers).
            per_model[key] = _export(model, kwargs, DECODE_KEY, shapes, check_guards=False)
    return _fresh_copy(per_model[key], train=model.training), layout


def _export(model: nn.Module, kwargs: dict[str, Any], sig: tuple, shapes: dict | None = None,
            check_guards: bool = True) -> fx.GraphModule:
    was_training = model.training
    model.train(True)  # capture dropout nodes; they become mode-aware modules below
    try:
        with torch.no_grad():
            ep = torch.export.export(model, (), kwargs, dynamic_shapes=shapes or _dynamic_shapes(kwargs), strict=False)
    except Exception as err:  # torch.export raises many types; we name the failing place
        raise CaptureError(_explain(model, err)) from err
    finally:
        model.train(was_training)
    unlifted = ep.module(check_guards=check_guards)
    gm = fx.GraphModule(unlifted, unlifted.graph, class_name=f"Captured{type(model).__name__}")
    from surgeon.passes.modes import dropout_as_modules

    gm = dropout_as_modules(gm)
    config = getattr(model, "config", None)
    out_emb = None
    if hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
        out_emb = next((p for p, m in model.named_modules() if m is head), None) if head is not None else None
    gm.meta["surgeon"] = CaptureInfo(
        signature=sig,
        modules=module_table(model),
        output_embedding=out_emb,
        model_type=getattr(config, "model_type", None),
        model_class=type(model).__name__,
    )
    return gm


def _explain(model: nn.Module, err: Exception) -> str:
    """One paragraph: what failed, where in the model's source, and what to try."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    where = ""
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if "/torch/" not in f.filename and not f.filename.startswith("<") and not f.filename.endswith("surgeon/capturing.py")]
    if frames:
        f = frames[-1]
        where = f"\n  at {f.filename}:{f.lineno}: {(f.line or '').strip()}"
    return (
        f"could not capture {type(model).__name__} with torch.export: {type(err).__name__}: {first}{where}\n"
        "  try: inputs that the model accepts (check the call signature), removing data-dependent Python "
        "control flow at that line, or a newer transformers release; pass example inputs to capture() "
        "to rule out synthesised ones"
    )
