"""Pass: fold LoRA branches into the base weights, and back.

Before: ``y = linear(x, W, b); z = lora(x, y)``.
After:  ``y = linear(x, W', b)`` with ``W' = W + scale * B @ A`` (transposed for GPT-2's Conv1D,
``[num, dim]`` for embeddings), computed in fp32 and cast to W's dtype. ``W'`` is a new tensor:
the input graph and the base model keep ``W``. Reads of ``modules_to_save`` copies become plain
attributes holding the active copy.

Each folded site records the factors it added, as they were at the fold, and the weight it
replaced. ``unfold`` puts that very weight back (bit for bit) when nothing wrote to it since, and
otherwise subtracts the recorded factors; training the adapters after a fold changes neither.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import fx, nn

from surgeon.errors import FoldError
from surgeon.graphs import copy_graph, fetch_attr, graphs_of, node_named, recompile_all, set_nested, subgraph
from surgeon.layers import IA3Layer, LoraLayer, SavedTensor
from surgeon.matching import SITE_OPS, branch_args, site_bias
from surgeon.names import FOLDED_ROOT, LORA_ROOT, folded_attr, folded_saved_attr, layer_attr, restored_attr
from surgeon.passes.merge_kernel import Factors, factors_of, write_merged

__all__ = ["FOLDED_ROOT", "FoldError", "FoldedSite", "fold", "lora_delta", "unfold"]
META_KEY = "surgeon_folded"  # graph.meta entry: the FoldedSite records of every fold applied so far


@dataclasses.dataclass(frozen=True)
class FoldedSite:
    """What ``unfold`` needs: where a branch was, its layer, the weight it replaced and the factors added."""

    graph_path: str
    node: str
    layer: LoraLayer
    original_target: str
    original: torch.Tensor
    original_version: int
    factors: Factors


def lora_delta(layer: LoraLayer, names: tuple[str, ...] | None = None) -> torch.Tensor | None:
    """``sum scale * B @ A`` over the layer's active (or named) plain LoRA adapters, fp32, in the base weight's layout
    (a DoRA adapter's change depends on the weight: ``fold`` it)."""
    factors = factors_of(layer, names)
    if not factors:
        return None
    delta = sum(b @ a * scale for b, a, scale, _ in factors)
    return delta if layer.kind == "linear" else delta.t()  # conv1d [in, out], embedding [num, dim]


def fold(gm: fx.GraphModule) -> fx.GraphModule:
    """A new graph with every active adapter folded into new weight tensors (the input is untouched)."""
    new = copy_graph(gm)
    folded: list[FoldedSite] = list(gm.meta.get(META_KEY, ()))
    tied_warned: set[str] = set()
    for gpath, sub in graphs_of(new):
        for node in list(sub.graph.nodes):
            module = sub.get_submodule(node.target) if node.op == "call_module" else None
            if isinstance(module, LoraLayer):
                folded.append(_fold_site(sub, gpath, node, tied_warned))
            elif isinstance(module, IA3Layer):
                folded.append(_fold_ia3_site(sub, gpath, node))
            elif isinstance(module, SavedTensor):
                _freeze_saved(sub, node)
    recompile_all(new)
    new.meta[META_KEY] = tuple(folded)
    leftover = [n for _, s in graphs_of(new) for n in s.graph.nodes
                if n.op == "call_module" and str(n.target).startswith(LORA_ROOT)]
    if leftover:
        raise RuntimeError(f"fold verifier: {len(leftover)} LoRA branches remain")
    return new


def _fold_site(sub: fx.GraphModule, gpath: str, branch: fx.Node, tied_warned: set) -> FoldedSite:
    layer: LoraLayer = sub.get_submodule(branch.target)
    site = branch.args[1]
    w_node = site.args[SITE_OPS[site.target][1]]
    weight = fetch_attr(sub, w_node.target)
    factors = factors_of(layer, weight=weight)
    new_weight = torch.empty_like(weight.detach(), memory_format=torch.contiguous_format)
    write_merged(weight, factors, layer.kind, layer.path, dst=new_weight)
    if any(u is not site and u is not branch for u in w_node.users) and layer.path not in tied_warned:
        tied_warned.add(layer.path)
        warnings.warn(f"fold: {layer.path} shares its weight with other layers (tied embeddings); the fold unties it: "
                      "only this layer gets the merged weight", stacklevel=3)
    attr = folded_attr(layer.path, site.name)
    set_nested(sub, attr, nn.Parameter(new_weight, requires_grad=False))
    with sub.graph.inserting_before(site):
        new_w = sub.graph.get_attr(attr)
    site.replace_input_with(w_node, new_w)
    branch.replace_all_uses_with(site)
    sub.graph.erase_node(branch)
    return FoldedSite(gpath, site.name, layer, w_node.target, weight, weight._version, factors)


def _fold_ia3_site(sub: fx.GraphModule, gpath: str, node: fx.Node) -> FoldedSite:
    """``W * l`` (and an output site's ``b * l``) in new tensors; the scaling node goes."""
    layer: IA3Layer = sub.get_submodule(node.target)
    site = next(iter(node.users)) if layer.feedforward else node.args[1]
    w_node = site.args[SITE_OPS[site.target][1]]
    weight = fetch_attr(sub, w_node.target)
    vector = layer.scaling() if layer.enabled else None
    if vector is not None:
        factor = layer.weight_factor(vector.detach().float())
        attr = folded_attr(layer.path, site.name)
        set_nested(sub, attr, nn.Parameter((weight.detach().float() * factor).to(weight.dtype), requires_grad=False))
        with sub.graph.inserting_before(site):
            site.replace_input_with(w_node, sub.graph.get_attr(attr))
        bias = None if layer.feedforward else site_bias(site)  # an input scale leaves the bias alone
        if isinstance(bias, fx.Node):
            b = fetch_attr(sub, bias.target)
            battr = folded_attr(layer.path, site.name + "_bias")
            set_nested(sub, battr, nn.Parameter((b.detach().float() * vector.detach().float()).to(b.dtype),
                                                requires_grad=False))
            with sub.graph.inserting_before(site):
                site.replace_input_with(bias, sub.graph.get_attr(battr))
    if layer.feedforward:
        site.replace_input_with(node, node.args[0])
    else:
        node.replace_all_uses_with(site)
    sub.graph.erase_node(node)
    return FoldedSite(gpath, site.name, layer, w_node.target, weight, weight._version, ())


def _freeze_saved(sub: fx.GraphModule, node: fx.Node) -> None:
    saved: SavedTensor = sub.get_submodule(node.target)
    attr = folded_saved_attr(saved.path)
    set_nested(sub, attr, nn.Parameter(saved().detach().clone(), requires_grad=False))
    with sub.graph.inserting_before(node):
        read = sub.graph.get_attr(attr)
    node.replace_all_uses_with(read)
    sub.graph.erase_node(node)


def unfold(gm: fx.GraphModule) -> fx.GraphModule:
    """A new graph with the branches back and each folded weight replaced by the one it came from."""
    new = copy_graph(gm)
    for record in gm.meta.get(META_KEY, ()):
        if isinstance(record.layer, IA3Layer):
            raise FoldError(f"unfold: {record.layer.path} holds a folded IA3 adapter; unfold covers LoRA folds. Keep "
                            "the graph you folded (fold leaves its input as it was)")
        sub = subgraph(new, record.graph_path)
        site = node_named(sub, record.node)
        w_node = site.args[SITE_OPS[site.target][1]]
        with sub.graph.inserting_before(site):
            weight = sub.graph.get_attr(_restore_weight(sub, record, fetch_attr(sub, w_node.target)))
        site.replace_input_with(w_node, weight)
        attr = layer_attr(record.layer.path)
        if attr not in dict(sub.named_modules()):
            sub.add_submodule(attr, record.layer)
        with sub.graph.inserting_after(site):
            branch = sub.graph.call_module(attr, branch_args(site, record.layer))
        site.replace_all_uses_with(branch, delete_user_cb=lambda u: u is not branch)
    recompile_all(new)
    new.meta[META_KEY] = ()
    return new


def _restore_weight(sub: fx.GraphModule, record: FoldedSite, folded: torch.Tensor) -> str:
    """The attribute holding the pre-fold weight: the original tensor itself while nothing wrote to it, else
    ``W' - recorded factors`` (the exact delta the fold added, so later training of the adapter cannot leak in)."""
    if record.original._version == record.original_version:
        try:
            if fetch_attr(sub, record.original_target) is record.original:
                return record.original_target  # still there (a tied weight other readers kept)
        except AttributeError:
            pass
        value = record.original if isinstance(record.original, nn.Parameter) else \
            nn.Parameter(record.original, requires_grad=False)
        set_nested(sub, record.original_target, value)
        return record.original_target
    restored = torch.empty_like(folded.detach(), memory_format=torch.contiguous_format)
    write_merged(folded, record.factors, record.layer.kind, record.layer.path, dst=restored, sign=-1.0)
    attr = restored_attr(record.layer.path, record.node)
    set_nested(sub, attr, nn.Parameter(restored, requires_grad=False))
    return attr
