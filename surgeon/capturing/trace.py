"""Capture: ``torch.export`` a module for one call signature into a plain ``fx.GraphModule``.

The graph shares the eager model's parameters (no copy), has dynamic batch and sequence dims,
and turns every dropout into a small module that reads ``self.training`` so that
``.train()`` / ``.eval()`` keep working. Each call returns a fresh copy, so a caller's passes never
see another caller's edits.

Two caches: per model object and signature, and per *structure*: a second model of the same class,
config, module tree and tensor shapes (a fresh ``from_pretrained``, another seed) gets the graph traced
for the first one with its own tensors bound in, instead of a new ``torch.export`` (seconds each). The
structural template holds meta tensors only, so it keeps no model's weights alive.
"""

from __future__ import annotations

import dataclasses
import itertools
import traceback
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim

from surgeon.capturing.decoder import DECODE_KEY, CacheLayout, cache_layout, decode_example, decode_forward, forward_as
from surgeon.capturing.inputs import dynamic_shapes, example_inputs, signature_of
from surgeon.capturing import store
from surgeon.capturing.modules import capture_info
from surgeon.errors import CaptureError
from surgeon.graphs import copy_graph
from surgeon.capturing.dropout import dropout_as_modules

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TEMPLATES: dict[tuple, fx.GraphModule] = {}  # structure key -> graph whose model tensors are meta tensors


def capture(model: nn.Module, example: Mapping[str, Any] | None = None, *, cache: bool = True) -> fx.GraphModule:
    """Export ``model`` for the call signature of ``example`` (synthesised when None).

    Returns a plain ``fx.GraphModule`` whose parameters are the model's own tensors, whose
    dropouts follow ``.train()``/``.eval()``, and whose ``meta["surgeon"]`` is a ``CaptureInfo``.
    """
    kwargs = example_inputs(model, example)
    sig = signature_of(kwargs)
    return _cached(model, sig, cache, lambda: _export(model, kwargs, sig, dynamic_shapes(kwargs)))


def capture_decoder(model: nn.Module, *, cache: bool = True) -> tuple[fx.GraphModule, CacheLayout]:
    """Export ``model`` (a ``*ForCausalLM``) for the decode signature (``surgeon.capturing.decoder``).

    The graph is called as ``graph(input_ids=, attention_mask=, position_ids=, past=[k0, v0, ...])``
    and returns ``(logits, presents)``; ``past`` may have length 0 (prefill).
    """
    layout = cache_layout(model)

    def export() -> fx.GraphModule:
        kwargs = decode_example(model, layout)
        shapes = {"input_ids": {0: Dim.AUTO, 1: Dim.AUTO}, "attention_mask": {0: Dim.AUTO, 1: Dim.AUTO},
                  "position_ids": {0: Dim.AUTO, 1: Dim.AUTO}, "past": [{0: Dim.AUTO, 2: Dim.AUTO} for _ in kwargs["past"]]}
        with forward_as(model, decode_forward(model)):
            # No input guards: export assumes sizes >= 2 (so total >= 4), but the graph is generic; prefill runs
            # with past 0 and decode with sequence 1 (tested down to one-token prompts, against eager transformers).
            return _export(model, kwargs, DECODE_KEY, shapes, check_guards=False)

    graph = _cached(model, DECODE_KEY, cache, export)
    graph.meta["cache_layout"] = layout
    return graph, layout


def forget(model: nn.Module) -> None:
    """Drop the graphs kept to copy for ``model``'s next captures: they hold its tensors, which FSDP replaces."""
    _CACHE.pop(model, None)


def _cached(model: nn.Module, sig: tuple, cache: bool, export) -> fx.GraphModule:
    per_model = _CACHE.setdefault(model, {}) if cache else {}
    key = (sig, _fingerprint(model))
    if key not in per_model:
        structure = _structure_key(model, sig) if cache else None
        graph = _bind(_TEMPLATES[structure], model) if structure in _TEMPLATES else None
        if graph is None and structure is not None:
            graph = _from_disk(model, structure, sig)
        if graph is None:
            graph = export()
            if structure is not None:
                _TEMPLATES[structure] = _template(graph)
                store.save(_TEMPLATES[structure], store.disk_key(structure))
        per_model[key] = graph
    new = copy_graph(per_model[key])
    new.train(model.training)
    return new


def _from_disk(model: nn.Module, structure: tuple, sig: tuple) -> fx.GraphModule | None:
    """The graph from the capture cache on disk (``store``), bound to ``model``'s tensors, or None."""
    graph = store.load(store.disk_key(structure), _model_tensors(model))
    if graph is None:
        return None
    graph.meta["surgeon"] = capture_info(model, sig)  # no in-memory template: the next model of it reads the file too
    return graph


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(itertools.chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)))


def _structure_key(model: nn.Module, sig: tuple) -> tuple | None:
    """What decides the traced graph besides tensor values; None when surgeon cannot tell (no config, or a module
    whose ``forward`` was replaced on the instance): such a model is always traced itself."""
    config = getattr(model, "config", None)
    if not hasattr(config, "to_json_string") or any("forward" in vars(m) for m in model.modules()):
        return None
    tensors = _model_tensors(model)
    groups: dict[int, list[str]] = {}
    for name, t in tensors.items():
        groups.setdefault(id(t), []).append(name)
    return (type(model), config.to_json_string(use_diff=False), getattr(config, "_attn_implementation", None), sig,
            tuple((n, type(m), m.extra_repr()) for n, m in model.named_modules()),
            tuple((n, tuple(t.shape), t.dtype, t.device, t.requires_grad) for n, t in tensors.items()),
            tuple(sorted(tuple(g) for g in groups.values() if len(g) > 1)))  # which tensors are tied


def _template(graph: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``graph`` whose parameters and buffers are meta tensors of the same shapes (graph-owned constants
    that no model attribute holds stay real)."""
    template = copy_graph(graph)
    for name, t in itertools.chain(template.named_parameters(remove_duplicate=False),
                                   template.named_buffers(remove_duplicate=False)):
        owner_path, _, leaf = name.rpartition(".")
        owner = template.get_submodule(owner_path)
        meta = t.detach().to("meta")
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(meta, requires_grad=t.requires_grad)
        else:
            owner._buffers[leaf] = meta
    return template


def _bind(template: fx.GraphModule, model: nn.Module) -> fx.GraphModule | None:
    """The template with ``model``'s own tensors at every meta tensor's name; None if one has no match."""
    tensors = _model_tensors(model)
    graph = copy_graph(template)
    for name, t in list(itertools.chain(graph.named_parameters(remove_duplicate=False),
                                        graph.named_buffers(remove_duplicate=False))):
        if t.device.type != "meta":
            continue
        own = tensors.get(name)
        if own is None or own.shape != t.shape or own.dtype != t.dtype:
            return None
        owner_path, _, leaf = name.rpartition(".")
        owner = graph.get_submodule(owner_path)
        (owner._parameters if leaf in owner._parameters else owner._buffers)[leaf] = own
    graph.meta["surgeon"] = dataclasses.replace(graph.meta["surgeon"])
    return graph


def _fingerprint(model: nn.Module) -> tuple:
    """Which tensors the model holds: a layer swapped (quantized, dequantized, untied) is a new model to capture."""
    return tuple((n, id(p), tuple(p.shape), p.dtype) for n, p in model.named_parameters(remove_duplicate=False))


def _export(model: nn.Module, kwargs: dict[str, Any], sig: tuple, shapes: dict, check_guards: bool = True) -> fx.GraphModule:
    was_training = model.training
    model.train(True)  # capture dropout nodes; they become mode-aware modules below
    try:
        with torch.no_grad():
            ep = torch.export.export(model, (), kwargs, dynamic_shapes=shapes, strict=False)
    except Exception as err:  # torch.export raises many types; we name the failing place
        raise CaptureError(_explain(model, err)) from err
    finally:
        model.train(was_training)
    unlifted = ep.module(check_guards=check_guards)
    gm = dropout_as_modules(fx.GraphModule(unlifted, unlifted.graph, class_name=f"Captured{type(model).__name__}"))
    gm.meta["surgeon"] = capture_info(model, sig)
    return gm


def _explain(model: nn.Module, err: Exception) -> str:
    """One paragraph: what failed, where in the model's source, and what to try."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    where = ""
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if "/torch/" not in f.filename and not f.filename.startswith("<") and "/surgeon/capturing/" not in f.filename]
    if frames:
        f = frames[-1]
        where = f"\n  at {f.filename}:{f.lineno}: {(f.line or '').strip()}"
    return (
        f"could not capture {type(model).__name__} with torch.export: {type(err).__name__}: {first}{where}\n"
        "  try: inputs that the model accepts (check the call signature), removing data-dependent Python "
        "control flow at that line, or a newer transformers release; pass example inputs to capture() "
        "to rule out synthesised ones"
    )
