"""``causal_attention``: the graph's attention calls take SDPA's causal fast path instead of a mask.

Under ``torch.export`` transformers cannot skip its mask (the check reads tensor values), so a
captured graph always builds a [batch, 1, seq, seq] boolean mask and hands it to
``scaled_dot_product_attention``, which then cannot use its causal kernel. Eager transformers skips the
mask when nothing is padded; this pass gives the graph the same choice: it returns a copy whose
attention calls pass ``is_causal=True`` and no mask, to be used only for calls whose attention mask
is all ones (or absent), which the caller checks per call.

The pass proves its own precondition: it evaluates the mask subgraph of every attention call on
all-ones inputs at two shapes and rewrites only if each mask is exactly the lower triangle (the
causal mask), so bidirectional encoders, packed-sequence masks and anything else are left alone.
Sliding-window attention is refused from the config (its mask equals the causal one only up to the
window).
"""

from __future__ import annotations

import copy

import torch
from torch import fx

from surgeon.capturing.dropout import AttentionDropout
from surgeon.graphs import copy_graph, fetch_attr, recompile_all

SDPA = torch.ops.aten.scaled_dot_product_attention.default
# tensor inputs a causal call may have: anything else (position_ids, a cache, cache_position) can change the mask
CAUSAL_SAFE_INPUTS = frozenset({"input_ids", "inputs_embeds", "attention_mask"})
_PROBE_SHAPES = ((2, 7), (1, 12))


def causal_attention(gm: fx.GraphModule, config=None) -> fx.GraphModule | None:
    """A copy of ``gm`` whose attention is causal without a mask, or None when that would not be exact."""
    if _sliding_window(config):
        return None
    sites = [n for n in gm.graph.nodes if _mask_of(gm, n) is not None]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    tensors = {n.target for n in placeholders if isinstance(n.meta.get("val"), torch.Tensor)}
    if not sites or not tensors <= CAUSAL_SAFE_INPUTS:
        return None
    masks = list({_mask_of(gm, n): None for n in sites})
    for b, s in _PROBE_SHAPES:
        values = _evaluate(gm, masks, b, s)
        if values is None or not all(_is_causal(v, s) for v in values):
            return None
    new = copy_graph(gm)
    for node in new.graph.nodes:
        if _mask_of(new, node) is None:
            continue
        if node.op == "call_module":
            module = copy.copy(new.get_submodule(node.target))
            module.is_causal = True
            new.add_submodule(node.target, module)
            node.args = node.args[:3]
        else:
            node.args = node.args[:3]
            node.kwargs = {k: v for k, v in node.kwargs.items() if k not in ("attn_mask", "is_causal")} | {"is_causal": True}
    recompile_all(new)
    return new


def _sliding_window(config) -> bool:
    return bool(getattr(config, "sliding_window", None)) and getattr(config, "use_sliding_window", True) is not False


def _mask_of(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The mask node an attention call reads (None: not an attention call, or one without a mask)."""
    if node.op == "call_function" and node.target is SDPA:
        if node.kwargs.get("is_causal") or (len(node.args) > 5 and node.args[5]):
            return None
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), AttentionDropout):
        if gm.get_submodule(node.target).is_causal:
            return None
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    else:
        return None
    return mask if isinstance(mask, fx.Node) else None


def _evaluate(gm: fx.GraphModule, outputs: list[fx.Node], batch: int, seq: int) -> list[torch.Tensor] | None:
    """The values of ``outputs`` for all-ones inputs of ``batch`` x ``seq`` (None if an input cannot be made)."""
    needed, stack = set(), list(outputs)
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    env: dict[fx.Node, object] = {}
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node not in needed:
                continue
            if node.op == "placeholder":
                value = _probe_input(node, batch, seq)
                if value is None:
                    return None
            elif node.op == "get_attr":
                value = fetch_attr(gm, node.target)
            else:
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: env[n])
                fn = gm.get_submodule(node.target) if node.op == "call_module" else node.target
                value = fn(*args, **kwargs)
            env[node] = value
    return [env[n] for n in outputs]


def _probe_input(node: fx.Node, batch: int, seq: int):
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return val if isinstance(val, (bool, int, float)) or val is None else None
    shape = [batch, seq] + [d for d in val.shape[2:]]
    if not all(isinstance(d, int) for d in shape) or val.dim() < 2:
        return None
    return (torch.zeros if val.is_floating_point() else torch.ones)(shape, dtype=val.dtype)


def _is_causal(mask: torch.Tensor, seq: int) -> bool:
    """Whether ``mask`` (boolean, or additive float) allows exactly the lower triangle of every [seq, seq] block."""
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape[-2:]) != (seq, seq):
        return False
    tril = torch.ones(seq, seq, dtype=torch.bool).tril()
    if mask.dtype == torch.bool:
        return bool((mask == tril).all())
    if not mask.is_floating_point():
        return False
    blocked = mask <= torch.finfo(mask.dtype).min / 2
    return bool(((mask == 0) == tril).all() and (blocked == ~tril).all())
