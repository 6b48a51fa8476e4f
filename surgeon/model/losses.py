"""The loss, computed outside the graph with the base model's own ``loss_function``, so that ``Trainer``'s
``num_items_in_batch`` and gradient accumulation behave exactly as with PEFT."""

from __future__ import annotations

from torch import nn
from transformers.loss.loss_utils import LOSS_MAPPING

# transformers loss types whose loss we compute outside the graph, and how to call them.
LOSS_CALLS = {
    "ForCausalLM": lambda fn, out, labels, cfg, n: fn(logits=out.logits, labels=labels, vocab_size=cfg.vocab_size,
                                                      num_items_in_batch=n),
    "ForSequenceClassification": lambda fn, out, labels, cfg, n: fn(labels=labels, pooled_logits=out.logits, config=cfg),
    "ForTokenClassification": lambda fn, out, labels, cfg, n: fn(logits=out.logits, labels=labels, config=cfg),
}


def loss_kind(model: nn.Module) -> str:
    """The key of ``model.loss_function`` in transformers' loss table ('' when it has none).

    Encoder-decoder models compute their own loss (in the graph): their ``loss_function`` falls back
    to the causal-LM loss, whose label shift would be wrong for them.
    """
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return ""
    try:
        fn = model.loss_function
    except AttributeError:
        return ""
    return next((k for k, v in LOSS_MAPPING.items() if v is fn), "")


def with_loss(model: nn.Module, out, labels, num_items_in_batch):
    """``out`` with its ``loss`` computed by the base model's loss function (or ``out`` as it is)."""
    call = LOSS_CALLS.get(loss_kind(model))
    if labels is None or call is None:
        return out
    loss = call(model.loss_function, out, labels, model.config, num_items_in_batch)
    return type(out)(loss=loss, **{k: v for k, v in out.items() if k != "loss"})
