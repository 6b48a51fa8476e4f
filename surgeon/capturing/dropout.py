"""Capture's last step: dropout nodes -> modules that read ``self.training``.

Before: ``aten.dropout(x, p, True)`` and ``aten.scaled_dot_product_attention(..., dropout_p=p)``
baked in at capture. After: ``call_module(Dropout(p))`` and ``call_module(AttentionDropout(p))``,
so ``graph.train()`` / ``graph.eval()`` switch them and ``torch.compile`` keeps a graph per mode.
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.nn import functional as F

from surgeon.names import dropout_attr

ATEN = torch.ops.aten
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class AttentionDropout(nn.Module):
    """Scaled dot-product attention whose dropout is on only in training."""

    def __init__(self, p: float, is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False):
        super().__init__()
        self.p, self.is_causal, self.scale, self.enable_gqa = p, is_causal, scale, enable_gqa

    def forward(self, query, key, value, attn_mask=None):
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=self.p if self.training else 0.0,
            is_causal=self.is_causal, scale=self.scale, enable_gqa=self.enable_gqa,
        )


def dropout_as_modules(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite ``gm`` in place and return it: capture calls it on the graph it just exported, which nobody holds yet."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is ATEN.dropout.default:
            x, p = node.args[0], float(node.args[1])
            module, args = nn.Dropout(p), (x,)
        elif node.target is ATEN.scaled_dot_product_attention.default:
            bound = dict(zip(SDPA_ARGS, node.args))
            bound.update(node.kwargs)
            p = float(bound.get("dropout_p", 0.0))
            if p == 0.0:
                continue
            module = AttentionDropout(p, bool(bound.get("is_causal", False)), bound.get("scale"), bool(bound.get("enable_gqa", False)))
            args = (bound["query"], bound["key"], bound["value"], bound.get("attn_mask"))
        else:
            continue
        name = dropout_attr(count)
        count += 1
        gm.add_submodule(name, module)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, args)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm
