"""``headless``: the graph without its output head, so that the loss can apply the head in chunks.

A causal LM's graph ends in ``logits = linear(hidden, lm_head.weight[, bias])``: [batch, seq, vocab]
floats (GPT-2: 50,257 per token), which the loss turns into a log-softmax of the same size and whose
gradient is as large again. The copy returned here outputs ``hidden`` in the logits' place and hands back
the head's weight and bias, for ``surgeon.model.chunked_loss``, which never holds more than a few
hundred rows of logits at a time.

Only an exact rewrite is made: the logits must come straight from one ``aten.linear`` whose weight (and
bias) are tensors of the graph (no adapter, softcapping or scaling after the head). Whether the head is
frozen can change after the cut, so the caller checks it per call (``surgeon.model.forward``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import fx

from surgeon.graphs import copy_graph, fetch_attr, recompile_all

LINEAR = torch.ops.aten.linear.default


class Head(NamedTuple):
    weight: torch.Tensor
    bias: torch.Tensor | None


def headless(gm: fx.GraphModule) -> tuple[fx.GraphModule, Head] | None:
    """(a copy of ``gm`` that outputs the head's input instead of the logits, the head), or None."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    flat = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    logits_index = _logits_index(gm)
    if logits_index is None or logits_index >= len(flat):
        return None
    head_node = flat[logits_index]
    if not (isinstance(head_node, fx.Node) and head_node.op == "call_function" and head_node.target is LINEAR):
        return None
    hidden, weight, bias = (list(head_node.args) + [head_node.kwargs.get("bias")])[:3]
    tensors = []
    for node in (weight, bias):
        if node is None:
            tensors.append(None)
            continue
        if not (isinstance(node, fx.Node) and node.op == "get_attr"):
            return None
        tensors.append(fetch_attr(gm, node.target))
    if len(head_node.users) != 1:  # the logits feed something besides the output
        return None
    new = copy_graph(gm)
    new_out = next(n for n in new.graph.nodes if n.op == "output")
    new_flat = list(new_out.args[0]) if isinstance(new_out.args[0], (tuple, list)) else [new_out.args[0]]
    new_hidden = new_flat[logits_index].args[0]
    new_flat[logits_index] = new_hidden
    new_out.args = (type(new_out.args[0])(new_flat) if isinstance(new_out.args[0], (tuple, list)) else new_flat[0],)
    recompile_all(new)
    return new, Head(tensors[0], tensors[1])


def _logits_index(gm: fx.GraphModule) -> int | None:
    """Where ``logits`` sits among the graph's flat outputs (from the output's pytree spec)."""
    info = getattr(gm.graph._codegen, "pytree_info", None)
    spec = getattr(info, "out_spec", None)
    keys = getattr(spec, "context", None)
    if not isinstance(keys, list) or "logits" not in keys:
        return None
    position = keys.index("logits")
    children = spec.children()
    if children[position].num_leaves != 1:
        return None
    return sum(child.num_leaves for child in children[:position])
