"""Generation arguments, checked once for both paths (torch ``generate`` and ONNX Runtime ``AdapterSession.generate``).

Meanings are transformers': ``temperature`` a finite number > 0 when sampling; ``top_k`` an integer >= 0 (0: off);
``top_p`` in [0, 1] (0 keeps only the most likely token, as transformers' ``min_tokens_to_keep=1`` does); token ids
integers in [0, vocab_size). This module imports numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from surgeon.errors import GenerationArgumentError


def _number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def check_sampling(settings: Mapping[str, Any], where: str = "generate") -> None:
    """Refuse sampling settings transformers would refuse (or silently misread), naming the argument and the fix."""
    sampling = bool(settings.get("do_sample"))
    if "temperature" in settings and settings["temperature"] is not None:
        t = settings["temperature"]
        if not _number(t) or not math.isfinite(t) or (sampling and t <= 0) or t < 0:
            raise GenerationArgumentError(f"{where}: temperature={t!r}: give a finite number > 0 (1.0 leaves the "
                                          "distribution as it is; for greedy decoding leave sampling off)")
    if "top_k" in settings and settings["top_k"] is not None:
        k = settings["top_k"]
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 0:
            raise GenerationArgumentError(f"{where}: top_k={k!r}: give an integer >= 0 (0 keeps every token)")
    if "top_p" in settings and settings["top_p"] is not None:
        p = settings["top_p"]
        if not _number(p) or not 0 <= p <= 1:
            raise GenerationArgumentError(f"{where}: top_p={p!r}: give a number in [0, 1] (1.0 keeps every token; "
                                          "0 keeps only the most likely one)")
    if "max_new_tokens" in settings and settings["max_new_tokens"] is not None:
        n = settings["max_new_tokens"]
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise GenerationArgumentError(f"{where}: max_new_tokens={n!r}: give an integer >= 1")


def check_token_ids(ids: np.ndarray, vocab_size: int | None, where: str = "generate") -> None:
    """Integer ids in [0, vocab_size); the first offending id is named with its position."""
    ids = np.asarray(ids)
    if ids.size == 0:
        raise GenerationArgumentError(f"{where}: input_ids is empty; give at least one prompt token")
    if not np.issubdtype(ids.dtype, np.integer):
        raise GenerationArgumentError(f"{where}: input_ids must be integer token ids, got dtype {ids.dtype}")
    bad = (ids < 0) | (ids >= vocab_size) if vocab_size else ids < 0
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        limit = f"[0, {vocab_size})" if vocab_size else ">= 0"
        raise GenerationArgumentError(f"{where}: input_ids{list(at)} = {int(ids[at])} is not a token id {limit}; "
                                      "encode the prompt with this model's tokenizer")
