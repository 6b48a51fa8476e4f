"""``SurgeonModel.generate``: transformers' own ``generate``, every forward served by the injected decode graph.

Every decoding strategy, logits processor and stopping rule is transformers'; for the duration of the
call the base model's forward is pointed at the decode graph (``surgeon.capturing.decoder``), whose
presents are written back into the ``DynamicCache`` that ``generate`` keeps between steps.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from surgeon.capturing.decoder import CacheLayout, check_decoder, context_length, forward_as
from surgeon.compat import NEW_CACHE_NAME, OLD_CACHE_NAME, cache_field, cache_name, check_kwargs
from surgeon.errors import GenerationError
from surgeon.sampling import check_sampling, check_token_ids


# ---- transformers' generate, driven by the decode graph --------------------------------------
def flat_past(cache, layout: CacheLayout, batch: int, device) -> list[torch.Tensor]:
    if cache is None or not getattr(cache, "layers", None) or not cache.layers[0].is_initialized:
        return layout.empty(batch, device)
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def store_presents(cache, presents: list[torch.Tensor]) -> None:
    while len(cache.layers) < len(presents) // 2:
        cache.layers.append(DynamicLayer())
    for i, layer in enumerate(cache.layers[: len(presents) // 2]):
        k, v = presents[2 * i], presents[2 * i + 1]
        if not layer.is_initialized:
            layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v


def positions_from_mask(mask: torch.Tensor, seq: int) -> torch.Tensor:
    """transformers' left-padding positions: running count of real tokens minus one (1 on padding)."""
    pos = mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(mask == 0, 1)
    return pos[:, -seq:]


# What transformers' generate may hand the forward besides ids, mask, positions and the cache, and the only
# values the decode graph can honour (anything else is refused by name, never dropped).
FIXED_FLAGS = {"use_cache": (None, True), "return_dict": (None, True), "output_attentions": (None, False),
               "output_hidden_states": (None, False)}


def graph_forward(model, graph, layout: CacheLayout):
    """A forward with the base model's signature that runs ``graph`` (the injected decode graph).

    It takes the cache under the name the installed transformers uses (``surgeon.compat.cache_name``)
    and refuses every other keyword by name, so a renamed argument upstream fails loudly instead of
    starting an empty cache at every step.
    """
    base = model.base
    name, field = cache_name(base), cache_field(CausalLMOutputWithPast)
    valid = {"input_ids", "attention_mask", "position_ids", "logits_to_keep", "inputs_embeds", "cache_position",
             name, *FIXED_FLAGS}

    @functools.wraps(base.forward)
    def forward(**kwargs):
        check_kwargs(f"{type(base).__name__}.forward (surgeon decode graph)", kwargs, valid,
                     "the decode graph takes only the arguments transformers' generate passes for a decoder")
        cache = _check_step_call(kwargs, name)
        input_ids = kwargs.get("input_ids")
        batch, seq = input_ids.shape
        past = flat_past(cache, layout, batch, input_ids.device)
        attention_mask = kwargs.get("attention_mask")
        check_step(attention_mask, kwargs.get("cache_position"), past[0].shape[2], seq)
        if attention_mask is None:
            attention_mask = torch.ones(batch, past[0].shape[2] + seq, dtype=torch.long, device=input_ids.device)
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, seq)
        logits, presents = graph(input_ids=input_ids, attention_mask=attention_mask.long(), position_ids=position_ids,
                                 past=past)
        store_presents(cache, presents)
        return CausalLMOutputWithPast(logits=_kept_logits(logits, kwargs.get("logits_to_keep")), **{field: cache})

    return forward


def _check_step_call(kwargs: dict, name: str) -> DynamicCache:
    """The flags the decode graph can honour, ids present, and the ``DynamicCache`` to use (a new one if none)."""
    for flag, allowed in FIXED_FLAGS.items():
        if kwargs.get(flag) not in allowed:
            raise GenerationError(f"{flag}={kwargs[flag]!r} is not supported by the decode graph "
                                  f"(it returns logits and the cache only)")
    cache = kwargs.get(name)
    if kwargs.get("inputs_embeds") is not None and kwargs.get("input_ids") is None:
        raise GenerationError("generate with inputs_embeds is not supported by the decode graph; pass input_ids")
    if cache is not None and not isinstance(cache, DynamicCache):
        raise GenerationError(f"the decode graph keeps a DynamicCache; got {type(cache).__name__} "
                              "(leave cache_implementation unset)")
    return cache if cache is not None else DynamicCache()


def _kept_logits(logits: torch.Tensor, keep) -> torch.Tensor:
    """transformers' ``logits_to_keep``: the last ``keep`` positions (0: all), or the positions a tensor names."""
    if isinstance(keep, int) and keep > 0:
        return logits[:, -keep:]
    if isinstance(keep, torch.Tensor):
        return logits[:, keep]
    return logits


def check_step(attention_mask, cache_position, past_len: int, seq: int) -> None:
    """The cache read must cover every position the mask (or ``cache_position``) says came before.

    This is the guard that a cache handed over under a name we did not read would trip: the mask
    grows by one per step while an unread cache stays empty.
    """
    if attention_mask is not None and attention_mask.shape[-1] != past_len + seq:
        raise GenerationError(f"the attention mask covers {attention_mask.shape[-1]} positions but the cache read by "
                              f"the decode graph holds {past_len} and the step adds {seq}; transformers passed the KV "
                              "cache in a way surgeon does not read (check the transformers version against "
                              "pyproject.toml's range)")
    if cache_position is not None and cache_position.numel() and int(cache_position.reshape(-1)[0]) != past_len:
        raise GenerationError(f"cache_position starts at {int(cache_position.reshape(-1)[0])} but the cache read by the "
                              f"decode graph holds {past_len} positions; transformers passed the KV cache in a way "
                              "surgeon does not read")


def check_generate_arguments(model: nn.Module, kwargs: dict[str, Any]) -> None:
    """Sampling settings and token ids, checked as ``AdapterSession.generate`` checks them (``surgeon.sampling``)."""
    where = f"{type(model).__name__}.generate"
    check_sampling(kwargs, where)
    ids = kwargs.get("input_ids")
    if isinstance(ids, torch.Tensor):
        check_token_ids(ids.detach().cpu().numpy(), getattr(model.config, "vocab_size", None), where)
    check_context(model, kwargs)


def check_context(model: nn.Module, kwargs: dict[str, Any]) -> None:
    """A prompt (plus the tokens asked for) longer than the model's positions fails here, not deep in the model."""
    context = context_length(model)
    ids = kwargs.get("input_ids")
    if context is None or not isinstance(ids, torch.Tensor):
        return
    prompt = ids.shape[-1]
    new = kwargs.get("max_new_tokens")
    if new is None:
        gen = kwargs.get("generation_config") or model.generation_config
        total = kwargs.get("max_length") or gen.max_length
        new = (gen.max_new_tokens if kwargs.get("max_length") is None and gen.max_new_tokens else max(total - prompt, 0))
    if prompt + new > context:
        raise GenerationError(f"prompt of {prompt} tokens + {new} new tokens exceeds {type(model).__name__}'s context of "
                              f"{context} positions; shorten the prompt to at most {max(context - new, 0)} tokens or ask "
                              f"for at most {max(context - prompt, 0)} new tokens")


def generate(model, *args, **kwargs):
    """``model.base.generate(...)`` with every forward served by the injected decode graph."""
    check_decoder(model.base)
    if args:
        kwargs.setdefault("input_ids", args[0])
        if len(args) > 1:
            raise GenerationError("pass generation arguments by name (input_ids=..., max_new_tokens=...)")
    check_generate_arguments(model.base, kwargs)
    if kwargs.get("cache_implementation") not in (None, "dynamic"):
        raise GenerationError(f"cache_implementation={kwargs['cache_implementation']!r} is not supported by the decode "
                              "graph, which keeps a DynamicCache; leave it unset")
    if kwargs.get("use_cache") is False:
        raise GenerationError("use_cache=False is not supported: the decode graph always uses the KV cache")
    if not {NEW_CACHE_NAME, OLD_CACHE_NAME} & set(kwargs):
        kwargs[cache_name(model.base)] = DynamicCache()  # generate was renamed in the same release as forward
    graph, layout = model.decoder_graph()
    with forward_as(model.base, graph_forward(model, graph, layout)):
        return model.base.generate(**kwargs)
