"""Prompt tuning on a ``SurgeonModel``: the virtual tokens go in front of the input's embeddings.

The captured graph is the base model's own, called with ``inputs_embeds``: the embedding lookup runs eagerly,
the prompt is put in front of its output, the attention mask gets ones and the labels -100 for the virtual
tokens (PEFT's rule). ``generate`` hands transformers the same embeddings for the prompt and continues on
the KV cache, as PEFT does; the new tokens are returned after ``input_ids``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from surgeon.errors import AdapterError
from surgeon.prompt_config import PromptTuningConfig


def filled(config: PromptTuningConfig, base: nn.Module) -> PromptTuningConfig:
    """The config with what PEFT records from the base model: token_dim, one submodule, heads, layers."""
    c = base.config
    return config.replace(token_dim=config.token_dim or base.get_input_embeddings().embedding_dim,
                          num_transformer_submodules=1,
                          num_attention_heads=config.num_attention_heads or getattr(c, "num_attention_heads", None),
                          num_layers=config.num_layers or getattr(c, "num_hidden_layers", None))


@torch.no_grad()
def initial_prompt(config: PromptTuningConfig, base: nn.Module) -> torch.Tensor:
    """PEFT's start: normal(0, 1) (RANDOM), the embeddings of random vocabulary ids (SAMPLE_VOCAB), or of the init
    text's tokens, repeated or cut to ``num_virtual_tokens`` (TEXT). A loaded adapter (inference_mode) skips it."""
    words = base.get_input_embeddings()
    n, dim = config.num_virtual_tokens, words.embedding_dim
    if config.inference_mode or config.prompt_tuning_init == "RANDOM":
        return torch.empty(n, dim, device=words.weight.device).normal_()
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        ids = torch.randint(0, words.num_embeddings, (n,), dtype=torch.long, device=words.weight.device)
    else:
        from surgeon.hub import load_tokenizer  # deferred: only TEXT init reads a tokenizer

        tokenizer = load_tokenizer(config.tokenizer_name_or_path)
        ids = list(tokenizer(config.prompt_tuning_init_text, **dict(config.tokenizer_kwargs or {}))["input_ids"])
        if not ids:
            raise AdapterError(f"prompt_tuning_init_text={config.prompt_tuning_init_text!r} gives no tokens; give "
                               "a text that does")
        ids = torch.tensor((ids * math.ceil(n / len(ids)))[:n], dtype=torch.long, device=words.weight.device)
    return words(ids).detach().clone().float()


def prompt_of(model) -> torch.Tensor | None:
    module = model.adapter_state.prompts()
    return module.prompt() if module is not None else None


def with_prompt(model, call: dict, labels):
    """``call`` (and labels) with the active prompt in front; unchanged when no prompt is active."""
    prompt = prompt_of(model)
    if prompt is None:
        return call, labels
    for name in ("position_ids", "token_type_ids"):
        if call.get(name) is not None:
            raise AdapterError(f"forward: {name} with prompt tuning: the virtual tokens shift every position; leave "
                               f"{name} out (PEFT drops it with a warning)")
    call = dict(call)
    ids, embeds = call.pop("input_ids", None), call.pop("inputs_embeds", None)
    if embeds is None:
        if ids is None:
            raise AdapterError("forward: prompt tuning needs input_ids or inputs_embeds")
        embeds = model.base.get_input_embeddings()(ids)
    batch, n = embeds.shape[0], prompt.shape[0]
    call["inputs_embeds"] = torch.cat([prompt.unsqueeze(0).expand(batch, -1, -1).to(embeds.dtype), embeds], dim=1)
    mask = call.get("attention_mask")
    if mask is not None:
        call["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
    if labels is not None:
        labels = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
    return call, labels


def generate_with_prompt(model, input_ids=None, attention_mask=None, **kwargs):
    """transformers' ``generate`` on the base with the prompt's embeddings in front (no graph: the base model is
    unchanged by prompt tuning); returns ``input_ids`` followed by the new tokens, as PEFT's does."""
    if input_ids is None:
        raise AdapterError("generate: prompt tuning needs input_ids")
    for name in ("inputs_embeds", "position_ids"):
        if kwargs.get(name) is not None:
            raise AdapterError(f"generate: {name} with prompt tuning is not supported; pass input_ids")
    call, _ = with_prompt(model, {"input_ids": input_ids, "attention_mask": attention_mask
                                  if attention_mask is not None else torch.ones_like(input_ids)}, None)
    new = model.base.generate(**call, **kwargs)
    return torch.cat([input_ids, new.to(input_ids.device)], dim=1)
