"""One forward call of a ``SurgeonModel``: which graph runs, and how the loss is computed.

Two exact fast paths, on by default (``model.fast_paths``; tested against the plain graph):

- **causal attention**: when the call's attention mask is all ones (or absent) and nothing else can change
  the mask (no position ids, no cache), the graph whose attention takes SDPA's causal kernel runs
  (``surgeon.passes.attention``); with padding, the masked graph;
- **chunked loss**: a causal LM called with ``labels`` whose logits are not wanted (by default: in training
  mode; ``skip_logits=False`` asks for them) runs the graph without its head, and the loss applies the
  head a few hundred rows at a time (``surgeon.model.chunked_loss``); ``logits`` is then None, as in
  transformers' Liger-kernel path.

``model.compile_graphs`` (``get_peft_model(..., compile=True)``) runs each graph through ``torch.compile``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from surgeon.capturing import accepts, signature_of
from surgeon.model.chunked_loss import chunked_causal_lm_loss
from surgeon.model.distributed import bind_gathered
from surgeon.model.losses import LOSS_CALLS, loss_kind, with_loss
from surgeon.passes.attention import CAUSAL_SAFE_INPUTS


def run_forward(model: nn.Module, call: dict[str, Any], labels, num_items_in_batch, skip_logits: bool | None):
    bind_gathered(model)  # under FSDP: the graphs read this forward's gathered weights
    return_dict = call.pop("return_dict", None)
    call = {k: v for k, v in call.items() if v is not None}
    base = model.base
    if "use_cache" not in call and not {"cache", "past_key_values"} & set(call) and accepts(base, "use_cache"):
        call["use_cache"] = False
    kind = loss_kind(base)
    if labels is not None and kind not in LOSS_CALLS:
        call["labels"] = labels  # unknown head: let the model compute its own loss in the graph
        labels = None
    graph, head = model.graph_for(**call), None
    if model.fast_paths:
        cut_head = labels is not None and kind == "ForCausalLM" and (model.training if skip_logits is None else skip_logits)
        graph, head = _fast_graph(model, call, cut_head) or (graph, None)
        if head is not None and any(t is not None and t.requires_grad for t in head):  # a trainable head: full logits
            graph, head = _fast_graph(model, call, False) or (model.graph_for(**call), None)
    elif skip_logits:
        raise ValueError("forward: skip_logits=True needs model.fast_paths (it is False on this model)")
    out = (model.graphs.compiled(graph) if model.compile_graphs else graph)(**call)
    if head is not None:
        loss = chunked_causal_lm_loss(out.logits, head, labels, num_items_in_batch)
        out = type(out)(loss=loss, **{k: v for k, v in out.items() if k not in ("loss", "logits")})
    else:
        out = with_loss(base, out, labels, num_items_in_batch)
    return out.to_tuple() if return_dict is False else out


@torch.compiler.disable  # under torch.compile(model): one graph break here, no guard on which variants exist yet
def _fast_graph(model: nn.Module, call: dict[str, Any], cut_head: bool):
    causal = _causal_call(call)
    if not (causal or cut_head):
        return None
    return model.graphs.fast(signature_of(call), call, causal=causal, cut_head=cut_head)


def _causal_call(call: dict[str, Any]) -> bool:
    """Whether the causal fast path gives this call the masked graph's result: no padding, no cache, no positions."""
    tensors = {k for k, v in call.items() if isinstance(v, torch.Tensor)}
    if not tensors <= CAUSAL_SAFE_INPUTS or call.get("use_cache", False):
        return False
    mask = call.get("attention_mask")
    return mask is None or bool(mask.all())
