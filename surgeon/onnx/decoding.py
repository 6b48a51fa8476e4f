"""Token-by-token generation on an ONNX export with a KV cache (numpy only, no torch).

``decode`` runs prefill then one step per token, feeding each step's ``present.*`` outputs back as
the next step's ``past_key_values.*`` inputs (``surgeon.names.past_of_present``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from surgeon.errors import AdapterError
from surgeon.names import LOGITS, past_names, past_of_present
from surgeon.sampling import check_token_ids

Run = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def check_prompt(input_ids, attention_mask, facts: dict, max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, mask)`` as int64 ``[batch, sequence]``, or the error naming what is wrong."""
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None, :]
    check_token_ids(ids, facts.get("vocab_size"), "AdapterSession.generate")
    if ids.ndim != 2:
        raise AdapterError(f"AdapterSession.generate: input_ids must be [batch, sequence], got shape {list(ids.shape)}")
    ids = ids.astype(np.int64)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    if mask.shape != ids.shape:
        raise AdapterError(f"AdapterSession.generate: attention_mask shape {list(mask.shape)} differs from "
                           f"input_ids {list(ids.shape)}")
    prompt = ids.shape[1]
    context = facts.get("context_length")
    if context and prompt + max_new_tokens > context:
        raise AdapterError(f"prompt of {prompt} tokens + max_new_tokens {max_new_tokens} exceeds the model's context "
                           f"of {context} positions; shorten the prompt to at most {max(context - max_new_tokens, 0)} "
                           f"tokens or lower max_new_tokens to {max(context - prompt, 0)}")
    return ids, mask


def decode(run: Run, facts: dict, ids: np.ndarray, mask: np.ndarray, *, max_new_tokens: int, sampling: dict,
           seed: int | None, eos_token_id, pad_token_id, on_tokens, prefix: int = 0) -> np.ndarray:
    """Prefill + decode with ``run`` (one session run per step, ``run(feeds, first)``); returns
    ``[batch, prompt + new]`` token ids.

    ``sampling`` (do_sample, temperature, top_k, top_p) was checked by the caller (``surgeon.sampling``).
    ``prefix``: a prompt-tuning adapter's virtual tokens, which the graph puts in front on the prefill: the mask
    and the prefill's positions cover them too.
    """
    eos = set(facts.get("eos_token_id") or []) if eos_token_id is None else set(np.atleast_1d(eos_token_id).tolist())
    pad = pad_token_id if pad_token_id is not None else facts.get("pad_token_id")
    pad = pad if pad is not None else (min(eos) if eos else 0)
    rng = np.random.default_rng(seed)
    feeds_for = past_of_present(facts["layers"])
    batch = ids.shape[0]
    past = empty_past(facts, batch)
    tokens, step_ids = ids, ids
    done = np.zeros(batch, dtype=bool)
    if prefix:
        mask = np.concatenate([np.ones((batch, prefix), mask.dtype), mask], axis=1)
    for step in range(max_new_tokens):
        seq = step_ids.shape[1] + (prefix if step == 0 else 0)
        positions = np.where(mask == 0, 1, np.cumsum(mask, axis=1) - 1)[:, -seq:]
        out = run({"input_ids": step_ids, "attention_mask": mask, "position_ids": positions, **past}, step == 0)
        nxt = pick_tokens(out[LOGITS][:, -1, :].astype(np.float32), rng, **sampling)
        nxt = np.where(done, pad, nxt)
        done |= np.isin(nxt, list(eos)) if eos else False
        tokens = np.concatenate([tokens, nxt[:, None]], axis=1)
        if on_tokens is not None:
            on_tokens(nxt)
        if done.all():
            break
        past = {feeds_for[k]: v for k, v in out.items() if k in feeds_for}
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        step_ids = nxt[:, None]
    return tokens


def empty_past(facts: dict, batch: int) -> dict[str, np.ndarray]:
    """The prefill's past: one zero-length ``past_key_values.{i}.key/value`` per layer (manifest ``generation`` facts)."""
    dtype = np.dtype(facts.get("cache_dtype", "float32"))
    names = iter(past_names(facts["layers"]))
    past = {}
    for heads, key_dim, value_dim in zip(facts["kv_heads"], facts["key_dim"], facts["value_dim"]):
        past[next(names)] = np.zeros((batch, heads, 0, key_dim), dtype)
        past[next(names)] = np.zeros((batch, heads, 0, value_dim), dtype)
    return past


def pick_tokens(logits: np.ndarray, rng: np.random.Generator, do_sample: bool, temperature: float, top_k: int,
                top_p: float) -> np.ndarray:
    """Greedy argmax, or a sample after temperature, top-k and top-p (nucleus) filtering, in that order."""
    if not do_sample:
        return logits.argmax(axis=-1)
    x = logits / temperature  # the settings were checked by surgeon.sampling.check_sampling
    if top_k and top_k < x.shape[-1]:
        kth = np.partition(x, -top_k, axis=-1)[:, -top_k][:, None]
        x = np.where(x < kth, -np.inf, x)
    if top_p < 1.0:
        order = np.argsort(-x, axis=-1)
        sorted_x = np.take_along_axis(x, order, axis=-1)
        probs = softmax(sorted_x)
        before = np.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above each one
        drop_sorted = before >= top_p  # as transformers: keep the smallest set reaching top_p
        drop_sorted[:, 0] = False  # and at least the most likely token (top_p=0: that one alone)
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        x = np.where(drop, -np.inf, x)
    probs = softmax(x)
    u = rng.random((x.shape[0], 1))
    picked = (np.cumsum(probs, axis=-1) < u).sum(axis=-1)
    return np.minimum(picked, x.shape[-1] - 1)


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)
