"""Pass: fold LoRA branches into the base weights, and back.

Before: ``y = linear(x, W, b); z = lora(x, y)``.
After:  ``y = linear(x, W', b)`` with ``W' = W + scale * B @ A`` (transposed for GPT-2's Conv1D,
``[num, dim]`` for embeddings), computed in fp32 and cast to W's dtype. ``W'`` is a new tensor:
the input graph and the base model keep ``W``. Reads of ``modules_to_save`` copies become plain
attributes holding the active copy. ``unfold`` re-inserts the branches and subtracts the delta.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import fx, nn

from surgeon.adapters import layer_attr
from surgeon.errors import SurgeonError
from surgeon.layers import LoraLayer, SavedTensor
from surgeon.matching import SITE_OPS, graphs_of
from surgeon.passes.graph_copy import copy_graph, fetch_attr, set_nested

FOLDED_ROOT = "surgeon_folded"


class FoldError(SurgeonError, FloatingPointError):
    """Folding produced NaN or Inf."""


@dataclasses.dataclass(frozen=True)
class FoldedSite:
    """What ``unfold`` needs: where a branch was, the layer it came from, the weight it replaced."""

    graph_path: str
    node: str
    layer: LoraLayer
    original_target: str


def lora_delta(layer: LoraLayer, names: tuple[str, ...] | None = None) -> torch.Tensor:
    """``sum scale * B @ A`` over the layer's active (or named) adapters, fp32, in the base weight's layout."""
    delta = None
    for name in names if names is not None else layer.active:
        if name not in layer.adapters:
            continue
        adapter = layer.adapters[name]
        d = (adapter.lora_B.detach().float() @ adapter.lora_A.detach().float()) * adapter.scaling.float()
        delta = d if delta is None else delta + d
    if delta is None:
        return None
    return delta if layer.kind == "linear" else delta.t()  # conv1d [in, out], embedding [num, dim]


CHUNK_ELEMENTS = 1 << 19  # ~2 MiB of fp32 per row chunk: the sum and its check stay in cache


def _factors(layer: LoraLayer, names: tuple[str, ...] | None):
    return [(a.lora_B[:, : a.r].detach().float(), a.lora_A[: a.r].detach().float(), float(a.scaling))
            for n in (names if names is not None else layer.active) if n in layer.adapters
            for a in (layer.adapters[n],)]


def _add_rows(out: torch.Tensor, factors, kind: str, start: int, stop: int, sign: float) -> torch.Tensor:
    """``out += sign * delta[start:stop]`` in the weight's layout, by addmm (no full-size delta)."""
    for b, a, scale in factors:
        if kind == "linear":  # W [out, in]: rows of B
            torch.addmm(out, b[start:stop], a, alpha=sign * scale, out=out)
        else:  # conv1d [in, out] and embedding [num, dim] hold (B @ A)^T: rows are columns of A
            torch.addmm(out, a[:, start:stop].t(), b.t(), alpha=sign * scale, out=out)
    return out


def write_merged(weight: torch.Tensor, layer: LoraLayer, names: tuple[str, ...] | None, *, dst: torch.Tensor | None = None,
                 sign: float = 1.0, check_only: bool = False) -> None:
    """``dst = weight + sign * scale * B @ A`` in fp32 row chunks, each checked for NaN/Inf before it is written.

    ``dst`` may be ``weight`` itself (in place): on a non-finite chunk the rows already written are
    rolled back (within fp32 rounding) and ``FoldError`` names the module. ``check_only`` writes nothing.
    """
    factors = _factors(layer, names)
    w = weight.detach()
    rows = max(1, CHUNK_ELEMENTS // max(1, w[0].numel()))
    for i in range(0, w.shape[0], rows):
        j = min(i + rows, w.shape[0])
        part = _add_rows(w[i:j].to(torch.float32, copy=True), factors, layer.kind, i, j, sign)
        if not torch.isfinite(part.sum()) and not torch.isfinite(part).all():
            if dst is weight and i and not check_only:
                back = _add_rows(w[:i].to(torch.float32, copy=True), factors, layer.kind, 0, i, -sign)
                w[:i].copy_(back)
            bad = (~torch.isfinite(part)).sum().item()
            raise FoldError(f"folding the adapter into {layer.path} gives {bad}+ NaN/Inf values; the adapter weights are "
                            "too large or already non-finite (check them with `surgeon inspect`)")
        if not check_only:
            (dst if dst is not None else w)[i:j].copy_(part)


def merged_weight(weight: torch.Tensor, delta: torch.Tensor | None, where: str, *, sign: float = 1.0) -> torch.Tensor:
    """``weight + sign * delta`` in fp32, checked for NaN/Inf, cast back to ``weight``'s dtype."""
    if delta is None:
        return weight.detach().clone()
    out = weight.detach().float() + sign * delta.to(weight.device)
    if not torch.isfinite(out).all():
        bad = (~torch.isfinite(out)).sum().item()
        raise FoldError(f"folding the adapter into {where} gives {bad} NaN/Inf values; the adapter weights are too large "
                        "or already non-finite (check them with `surgeon inspect`)")
    return out.to(weight.dtype)


def fold(gm: fx.GraphModule) -> fx.GraphModule:
    """A new graph with every active adapter folded into new weight tensors (the input is untouched)."""
    new = copy_graph(gm)
    folded: list[FoldedSite] = list(gm.meta.get("surgeon_folded", ()))
    tied_warned = set()
    for gpath, sub in graphs_of(new):
        for node in list(sub.graph.nodes):
            if node.op == "call_module" and isinstance(sub.get_submodule(node.target), LoraLayer):
                folded.append(_fold_site(new, sub, gpath, node, tied_warned))
            elif node.op == "call_module" and isinstance(sub.get_submodule(node.target), SavedTensor):
                _freeze_saved(sub, node)
        sub.graph.eliminate_dead_code()
        sub.graph.lint()
        sub.recompile()
    new.meta["surgeon_folded"] = tuple(folded)
    leftover = [n for _, s in graphs_of(new) for n in s.graph.nodes if n.op == "call_module" and str(n.target).startswith("surgeon_lora")]
    if leftover:
        raise RuntimeError(f"fold verifier: {len(leftover)} LoRA branches remain")
    return new


def _fold_site(root: fx.GraphModule, sub: fx.GraphModule, gpath: str, branch: fx.Node, tied_warned: set) -> FoldedSite:
    layer: LoraLayer = sub.get_submodule(branch.target)
    site = branch.args[1]
    w_node = site.args[SITE_OPS[site.target][1]]
    weight = fetch_attr(sub, w_node.target)
    new_weight = torch.empty_like(weight.detach(), memory_format=torch.contiguous_format)
    write_merged(weight, layer, None, dst=new_weight)
    shared = [u for u in w_node.users if u is not site]
    if shared and layer.path not in tied_warned:
        tied_warned.add(layer.path)
        warnings.warn(f"fold: {layer.path} shares its weight with other layers (tied embeddings); the fold unties it: "
                      "only this layer gets the merged weight", stacklevel=3)
    attr = f"{FOLDED_ROOT}.{layer_attr(layer.path).split('.', 1)[1]}.{site.name}"
    set_nested(sub, attr, nn.Parameter(new_weight, requires_grad=False))
    with sub.graph.inserting_before(site):
        new_w = sub.graph.get_attr(attr)
    site.replace_input_with(w_node, new_w)
    branch.replace_all_uses_with(site)
    sub.graph.erase_node(branch)
    return FoldedSite(gpath, site.name, layer, w_node.target)


def _freeze_saved(sub: fx.GraphModule, node: fx.Node) -> None:
    saved: SavedTensor = sub.get_submodule(node.target)
    attr = f"{FOLDED_ROOT}.{node.target.split('.', 1)[1]}"
    set_nested(sub, attr, nn.Parameter(saved().detach().clone(), requires_grad=False))
    with sub.graph.inserting_before(node):
        read = sub.graph.get_attr(attr)
    node.replace_all_uses_with(read)
    sub.graph.erase_node(node)


def unfold(gm: fx.GraphModule) -> fx.GraphModule:
    """A new graph with the branches back and ``W = W' - scale * B @ A`` (equal to W within fp32 rounding)."""
    new = copy_graph(gm)
    for site_info in gm.meta.get("surgeon_folded", ()):
        sub = new.get_submodule(site_info.graph_path) if site_info.graph_path else new
        site = next(n for n in sub.graph.nodes if n.name == site_info.node)
        w_node = site.args[SITE_OPS[site.target][1]]
        layer = site_info.layer
        restored = merged_weight(fetch_attr(sub, w_node.target), lora_delta(layer), layer.path, sign=-1.0)
        attr = f"{FOLDED_ROOT}.restored.{layer_attr(layer.path).split('.', 1)[1]}.{site.name}"
        set_nested(sub, attr, nn.Parameter(restored, requires_grad=False))
        with sub.graph.inserting_before(site):
            w = sub.graph.get_attr(attr)
        site.replace_input_with(w_node, w)
        lattr = layer_attr(layer.path)
        try:
            sub.get_submodule(lattr)
        except AttributeError:
            sub.add_submodule(lattr, layer)
        x = site.args[SITE_OPS[site.target][2]]
        with sub.graph.inserting_after(site):
            branch = sub.graph.call_module(lattr, (x, site))
        site.replace_all_uses_with(branch, delete_user_cb=lambda u: u is not branch)
    for _, sub in graphs_of(new):
        sub.graph.eliminate_dead_code()
        sub.graph.lint()
        sub.recompile()
    new.meta["surgeon_folded"] = ()
    return new
