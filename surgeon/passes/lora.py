"""Pass: inject LoRA branches into a captured graph.

Before: ``y = linear(x, W, b)`` (or GPT-2's ``addmm(b, x, W)``, or ``embedding(W, ids)``).
After:  ``z = call_module(surgeon_lora.<path>, (x, y))`` and every former user of ``y`` reads ``z``.
Parameters of ``modules_to_save`` are read through ``call_module(surgeon_saved.<param>)``, which
returns the active adapter's trainable copy. The input graph is never edited.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import fx, nn

from surgeon.adapters import layer_attr, saved_attr
from surgeon.config import LoraConfig
from surgeon.errors import AdapterError
from surgeon.layers import LoraAdapter, LoraLayer, SavedTensor
from surgeon.matching import SITE_OPS, Match, graphs_of, match, module_path_of
from surgeon.passes.graph_copy import copy_graph, fetch_attr, node_named, subgraph


def inject_lora(gm: fx.GraphModule, config: LoraConfig, adapter_name: str = "default", *,
                reuse: Mapping[str, nn.Module] | None = None) -> fx.GraphModule:
    """Return a new graph with adapter ``adapter_name`` added at every target of ``config``.

    ``reuse`` maps layer attributes to existing ``LoraLayer`` / ``SavedTensor`` modules (so that
    several graphs of one model share adapters). A site that already has a LoRA branch keeps it and
    its layer gains the adapter. The new adapter becomes the layers' active one only where no
    adapter is active yet. ``requires_grad`` of base parameters is left alone.
    """
    found = match(gm, config)
    new = copy_graph(gm)
    reuse = dict(reuse or {})
    before = _count_nodes(new)
    added = 0
    for target in found.targets:
        attr = layer_attr(target.path)
        layer = _existing(new, attr)
        if layer is not None and adapter_name in layer.adapters and reuse.get(attr) is not layer:
            raise AdapterError(f"adapter {adapter_name!r} already exists at {target.path}; pick another name or delete it first")
        layer = layer or reuse.get(attr) or LoraLayer(target.path, target.kind, target.in_features, target.out_features)
        if adapter_name not in layer.adapters:  # a reused layer may carry it already (another signature's graph)
            weight = _site_weight(new, target.sites[0])
            layer.adapters[adapter_name] = LoraAdapter(
                target.kind, target.in_features, target.out_features, target.r, target.scale,
                config.lora_dropout, config.init_lora_weights, dtype=_adapter_dtype(weight), device=weight.device,
            )
        if not layer.active:
            layer.active = (adapter_name,)
        for site in target.sites:
            added += _wrap_site(subgraph(new, site.graph_path), site.node, attr, layer)
    added += _redirect_saved(new, found, adapter_name, reuse)
    for _, sub in graphs_of(new):
        sub.graph.lint()
        sub.recompile()
    verify_injected(new, found, before + added)
    return new


def _existing(gm: fx.GraphModule, attr: str):
    try:
        return gm.get_submodule(attr)
    except AttributeError:
        return None


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapters train in fp32 on half-precision bases (PEFT's autocast_adapter_dtype default)."""
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) or not weight.is_floating_point() else weight.dtype


def _site_weight(gm: fx.GraphModule, site) -> torch.Tensor:
    sub = subgraph(gm, site.graph_path)
    node = node_named(sub, site.node)
    w = node.args[SITE_OPS[node.target][1]]
    return fetch_attr(sub, w.target)


def _wrap_site(sub: fx.GraphModule, node_name: str, attr: str, layer: LoraLayer) -> int:
    node = node_named(sub, node_name)
    if any(u.op == "call_module" and u.target == attr for u in node.users):
        return 0  # already wrapped: the layer just gained an adapter
    if _existing(sub, attr) is None:
        sub.add_submodule(attr, layer)
    x = node.args[SITE_OPS[node.target][2]]
    with sub.graph.inserting_after(node):
        branch = sub.graph.call_module(attr, (x, node))
    branch.meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace", "val")}
    node.replace_all_uses_with(branch, delete_user_cb=lambda user: user is not branch)
    return 1


def _redirect_saved(gm: fx.GraphModule, found: Match, adapter_name: str, reuse: Mapping[str, nn.Module]) -> int:
    """Point every read of a modules_to_save parameter at a ``SavedTensor``; returns nodes added."""
    added = 0
    for _, sub in graphs_of(gm):
        for node in list(sub.graph.nodes):
            path = module_path_of(node) if node.op == "call_function" else None
            if path is None or not any(path == s or path.startswith(s + ".") for s in found.modules_to_save):
                continue
            for arg in list(node.all_input_nodes):
                if arg.op == "call_module" and isinstance(sub.get_submodule(arg.target), SavedTensor):
                    _add_copy(sub.get_submodule(arg.target), adapter_name)  # redirected by an earlier adapter
                    continue
                if arg.op != "get_attr":
                    continue
                key = f"{path}.{arg.target.rsplit('.', 1)[-1]}"
                attr = saved_attr(key)
                saved = _existing(sub, attr) or _existing(gm, attr) or reuse.get(attr)
                if saved is None:
                    saved = SavedTensor(key, fetch_attr(sub, arg.target))
                _add_copy(saved, adapter_name)
                if _existing(sub, attr) is None:
                    sub.add_submodule(attr, saved)
                with sub.graph.inserting_before(node):
                    read = sub.graph.call_module(attr, ())
                node.replace_input_with(arg, read)
                added += 1
                if not arg.users:
                    sub.graph.erase_node(arg)
                    added -= 1
    return added


def _add_copy(saved: SavedTensor, adapter_name: str) -> None:
    if adapter_name not in saved.copies:
        saved.add(adapter_name)
    if not saved.active:
        saved.active = (adapter_name,)


def _count_nodes(gm: fx.GraphModule) -> int:
    return sum(len(sub.graph.nodes) for _, sub in graphs_of(gm))


def verify_injected(gm: fx.GraphModule, found: Match, expected_nodes: int) -> None:
    """Every target site has exactly one LoRA branch fed by that site; nothing else changed."""
    for target in found.targets:
        attr = layer_attr(target.path)
        for site in target.sites:
            node = node_named(subgraph(gm, site.graph_path), site.node)
            branches = [u for u in node.users if u.op == "call_module" and u.target == attr]
            if len(branches) != 1 or set(node.users) != set(branches):
                raise RuntimeError(f"inject_lora verifier: {target.path} ({site.node}) has {len(branches)} LoRA branches "
                                   f"and {len(node.users) - len(branches)} other readers; expected exactly one branch")
    if _count_nodes(gm) != expected_nodes:
        raise RuntimeError(f"inject_lora verifier: graph has {_count_nodes(gm)} nodes, expected {expected_nodes}")
