"""Pass: inject LoRA branches into a captured graph.

Before: ``y = linear(x, W, b)`` (or GPT-2's ``addmm(b, x, W)``, or ``embedding(W, ids)``).
After:  ``z = call_module(surgeon_lora.<path>, (x, y))`` and every former user of ``y`` reads ``z``.
Parameters of ``modules_to_save`` are read through ``call_module(surgeon_saved.<param>)``, which
returns the active adapter's trainable copy.

Two steps, so that a model can own its adapters: ``new_adapter_modules`` makes the modules for one
adapter (copies of the layers the graph already holds, gaining the new adapter), and ``attach``
returns a new graph that calls the modules it is given. Neither edits its input graph or the
modules that graph holds.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import fx, nn

from surgeon.config import LoraConfig
from surgeon.errors import AdapterError, QuantizationError
from surgeon.graphs import copy_graph, existing, fetch_attr, graphs_of, module_path_of, node_named, subgraph
from surgeon.ia3_config import IA3Config
from surgeon.layers import IA3Layer, IA3Vector, LoraAdapter, LoraLayer, SavedTensor
from surgeon.matching import SITE_OPS, Match, Target, branch_args, match
from surgeon.names import layer_attr, saved_attr


def inject_lora(gm: fx.GraphModule, config: LoraConfig, adapter_name: str = "default") -> fx.GraphModule:
    """Return a new graph with adapter ``adapter_name`` added at every target of ``config``.

    A site that already has a LoRA branch keeps it; the new graph's layer there is a copy of the old
    one (same adapter tensors) that also holds the new adapter. The new adapter becomes a layer's
    active one only where none is active yet. ``gm``, its modules and ``requires_grad`` of base
    parameters are left as they were.
    """
    found = match(gm, config)
    return attach(gm, found, new_adapter_modules(gm, found, config, adapter_name))


def new_adapter_modules(gm: fx.GraphModule, found: Match, config: LoraConfig, adapter_name: str,
                        *, into: Mapping[str, nn.Module] | None = None) -> dict[str, nn.Module]:
    """The LoRA layers and saved-tensor modules of ``found`` with adapter ``adapter_name`` added.

    ``into`` maps attributes to modules to extend in place (a model passes its own registry: it owns
    those); any other module is a fresh one or a copy of the one ``gm`` holds.
    """
    into = dict(into or {})
    out: dict[str, nn.Module] = {}
    ia3 = isinstance(config, IA3Config)
    for target in found.targets:
        attr = layer_attr(target.path)
        layer = into.get(attr)
        if layer is None:
            held = existing(gm, attr)
            layer = held.shallow_copy() if held is not None else _new_layer(gm, target, config)
        if adapter_name in layer.adapters:
            raise AdapterError(f"adapter {adapter_name!r} already exists at {target.path}; pick another name or delete "
                               "it first")
        if ia3:
            add_ia3(layer, target, config, adapter_name, _site_weight(gm, target))
        else:
            add_adapter(layer, target, config, adapter_name, _site_weight(gm, target))
        out[attr] = layer
    for key, original in saved_parameters(gm, found):
        attr = saved_attr(key)
        saved = into.get(attr) or out.get(attr)
        if saved is None:
            held = existing(gm, attr)
            saved = held.shallow_copy() if held is not None else SavedTensor(key, original)
        if adapter_name not in saved.copies:
            saved.add(adapter_name)
        saved.active = saved.active or (adapter_name,)
        out[attr] = saved
    return out


def _new_layer(gm: fx.GraphModule, target: Target, config) -> nn.Module:
    if not isinstance(config, IA3Config):
        return LoraLayer(target.path, target.kind, target.in_features, target.out_features)
    if target.kind == "embedding":
        raise AdapterError(f"IA3: {target.path} is an embedding; (IA)^3 scales linear layers only. Leave it out of "
                           "target_modules")
    return IA3Layer(target.path, target.kind, target.in_features, target.out_features,
                    config.is_feedforward(target.path, gm.meta["surgeon"].model_type))


def add_ia3(layer: IA3Layer, target: Target, config: IA3Config, name: str, weight: torch.Tensor) -> None:
    """Give ``layer`` a fresh (IA)^3 vector ``name`` (ones, or random with ``init_ia3_weights=False``)."""
    if not weight.is_floating_point():
        raise QuantizationError(f"IA3: {target.path} is a quantized (packed {weight.dtype}) linear; load the base in "
                                "float for IA3, or use LoRA (QLoRA) on a 4/8-bit base")
    size = target.in_features if layer.feedforward else target.out_features
    layer.adapters[name] = IA3Vector(size, layer.feedforward, config.init_ia3_weights, dtype=_adapter_dtype(weight),
                                     device=weight.device)
    layer.active = layer.active or (name,)


def add_adapter(layer: LoraLayer, target: Target, config: LoraConfig, name: str, weight: torch.Tensor) -> None:
    """Give ``layer`` a freshly initialised adapter ``name`` for ``target`` (on the base weight's device)."""
    if config.use_dora and target.kind == "embedding":
        raise AdapterError(f"use_dora=True: {target.path} is an embedding; surgeon applies DoRA to linear layers only. "
                           "Leave it out of target_modules, or adapt it with plain LoRA in another adapter")
    if config.use_dora and not weight.is_floating_point():
        raise QuantizationError(f"use_dora=True: {target.path} is a quantized (packed {weight.dtype}) linear; DoRA "
                                "needs the weight's column norms. Load the base in float, or set use_dora=False")
    adapter = LoraAdapter(target.kind, target.in_features, target.out_features, target.r, target.scale,
                          config.lora_dropout, config.init_lora_weights, dtype=_adapter_dtype(weight),
                          device=weight.device, dora=config.use_dora)
    if adapter.dora:
        adapter.init_magnitude(weight)
    layer.adapters[name] = adapter
    layer.active = layer.active or (name,)


def attach(gm: fx.GraphModule, found: Match, modules: Mapping[str, nn.Module]) -> fx.GraphModule:
    """A new graph whose target sites call ``modules[layer_attr(path)]`` and whose modules_to_save parameters
    are read through ``modules[saved_attr(param)]``; sites already wrapped keep their branch (now calling the
    given module). Verified: one branch per site, and nothing else changed."""
    new = copy_graph(gm)
    for attr, module in modules.items():  # the copy's own attribute tree: gm keeps its modules
        for _, sub in graphs_of(new):
            if existing(sub, attr) is not None:
                _replace_module(sub, attr, module)
    before = _count_nodes(new)
    added = 0
    for target in found.targets:
        attr = layer_attr(target.path)
        wrap = _wrap_input if getattr(modules[attr], "feedforward", False) else _wrap_site
        for site in target.sites:
            added += wrap(subgraph(new, site.graph_path), site.node, attr, modules[attr])
    added += _redirect_saved(new, found, modules)
    for _, sub in graphs_of(new):
        sub.graph.lint()
        sub.recompile()
    verify_injected(new, found, before + added)
    return new


def _replace_module(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapters train in fp32 on half-precision bases (PEFT's autocast_adapter_dtype default)."""
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) or not weight.is_floating_point() else weight.dtype


def _site_weight(gm: fx.GraphModule, target: Target) -> torch.Tensor:
    site = target.sites[0]
    sub = subgraph(gm, site.graph_path)
    node = node_named(sub, site.node)
    return fetch_attr(sub, node.args[SITE_OPS[node.target][1]].target)


def _wrap_site(sub: fx.GraphModule, node_name: str, attr: str, layer: LoraLayer) -> int:
    node = node_named(sub, node_name)
    args = branch_args(node, layer)
    wrapped = [u for u in node.users if u.op == "call_module" and u.target == attr]
    if wrapped:  # already wrapped; a first DoRA adapter there gets the weight and bias passed too
        if len(args) > len(wrapped[0].args):
            wrapped[0].args = args
        return 0
    if existing(sub, attr) is None:
        sub.add_submodule(attr, layer)
    with sub.graph.inserting_after(node):
        branch = sub.graph.call_module(attr, args)
    branch.meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace", "val")}
    node.replace_all_uses_with(branch, delete_user_cb=lambda user: user is not branch)
    return 1


def _wrap_input(sub: fx.GraphModule, node_name: str, attr: str, layer: IA3Layer) -> int:
    """A feed-forward (IA)^3 site: the linear reads ``call_module(attr, (x,))`` (``x * l``) instead of ``x``."""
    node = node_named(sub, node_name)
    index = SITE_OPS[node.target][2]
    x = node.args[index]
    if isinstance(x, fx.Node) and x.op == "call_module" and x.target == attr:
        return 0  # already wrapped
    if existing(sub, attr) is None:
        sub.add_submodule(attr, layer)
    with sub.graph.inserting_before(node):
        scaled = sub.graph.call_module(attr, (x,))
    scaled.meta = {k: v for k, v in x.meta.items() if k == "val"} | \
        {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")}
    node.update_arg(index, scaled)
    return 1


def _saved_reads(gm: fx.GraphModule, found: Match) -> Iterator[tuple[fx.GraphModule, fx.Node, fx.Node, str]]:
    """``(subgraph, reader node, input node, parameter path)`` for each read of a modules_to_save parameter."""
    for _, sub in graphs_of(gm):
        for node in list(sub.graph.nodes):
            path = module_path_of(node) if node.op == "call_function" else None
            if path is None or not any(path == s or path.startswith(s + ".") for s in found.modules_to_save):
                continue
            for arg in list(node.all_input_nodes):
                if arg.op == "get_attr":
                    yield sub, node, arg, f"{path}.{arg.target.rpartition('.')[2]}"


def saved_parameters(gm: fx.GraphModule, found: Match) -> list[tuple[str, torch.Tensor]]:
    """``(parameter path, tensor)`` of every modules_to_save parameter the graph reads (each once)."""
    seen: dict[str, torch.Tensor] = {}
    for sub, _, arg, key in _saved_reads(gm, found):
        seen.setdefault(key, fetch_attr(sub, arg.target))
    for _, sub in graphs_of(gm):  # parameters an earlier adapter redirected already
        for node in sub.graph.nodes:
            if node.op == "call_module" and isinstance(sub.get_submodule(node.target), SavedTensor):
                saved = sub.get_submodule(node.target)
                if any(saved.path.startswith(s + ".") for s in found.modules_to_save):
                    seen.setdefault(saved.path, saved.original)
    return list(seen.items())


def _redirect_saved(gm: fx.GraphModule, found: Match, modules: Mapping[str, nn.Module]) -> int:
    """Point every plain read of a modules_to_save parameter at its ``SavedTensor``; returns nodes added."""
    added = 0
    for sub, node, arg, key in list(_saved_reads(gm, found)):
        attr = saved_attr(key)
        if existing(sub, attr) is None:
            sub.add_submodule(attr, modules[attr])
        with sub.graph.inserting_before(node):
            read = sub.graph.call_module(attr, ())
        node.replace_input_with(arg, read)
        added += 1
        if not arg.users:
            sub.graph.erase_node(arg)
            added -= 1
    return added


def _count_nodes(gm: fx.GraphModule) -> int:
    return sum(len(sub.graph.nodes) for _, sub in graphs_of(gm))


def verify_injected(gm: fx.GraphModule, found: Match, expected_nodes: int) -> None:
    """Every target site has exactly one LoRA branch fed by that site; nothing else changed."""
    for target in found.targets:
        attr = layer_attr(target.path)
        for site in target.sites:
            node = node_named(subgraph(gm, site.graph_path), site.node)
            x = node.args[SITE_OPS[node.target][2]]
            if isinstance(x, fx.Node) and x.op == "call_module" and x.target == attr:
                continue  # a feed-forward (IA)^3 site: the scaled input is its branch
            branches = [u for u in node.users if u.op == "call_module" and u.target == attr]
            if len(branches) != 1 or set(node.users) != set(branches):
                raise RuntimeError(f"inject_lora verifier: {target.path} ({site.node}) has {len(branches)} LoRA branches "
                                   f"and {len(node.users) - len(branches)} other readers; expected exactly one branch")
    if _count_nodes(gm) != expected_nodes:
        raise RuntimeError(f"inject_lora verifier: graph has {_count_nodes(gm)} nodes, expected {expected_nodes}")
