"""``surgeon check`` for a prompt-tuning adapter: the virtual positions in the feeds and in the reference.

ONNX Runtime gets the attention mask and the position ids with the n virtual tokens in front (what
``AdapterSession.generate`` feeds on the prefill); the torch reference runs the base on the prompt's embeddings in
front of the input's, with those same positions, so left-padded rows compare too.
"""

from __future__ import annotations

import numpy as np
import torch


def with_virtual(feeds: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """``feeds`` with n ones in front of the mask and the positions recomputed over n + s."""
    if not n:
        return feeds
    b = feeds["input_ids"].shape[0]
    mask = np.concatenate([np.ones((b, n), np.int64), feeds["attention_mask"]], axis=1)
    out = {**feeds, "attention_mask": mask}
    if "position_ids" in feeds:
        out["position_ids"] = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    return out


def prompt_logits(model, feeds: dict[str, np.ndarray], adapter: str) -> np.ndarray:
    """The reference logits [b, n + s, vocab] for ``feeds`` from ``with_virtual``."""
    prompt = model.adapter_state.prompts().adapters[adapter].detach()
    ids = torch.from_numpy(feeds["input_ids"])
    with torch.no_grad():
        embeds = model.base.get_input_embeddings()(ids)
        rows = prompt.unsqueeze(0).expand(ids.shape[0], -1, -1).to(embeds.dtype)
        call = {"inputs_embeds": torch.cat([rows, embeds], dim=1),
                **{k: torch.from_numpy(v) for k, v in feeds.items() if k != "input_ids"}}
        return model.base(**call).logits.numpy()
