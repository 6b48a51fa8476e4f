"""The causal-LM loss with the output head applied in chunks: transformers' ``ForCausalLMLoss`` without
the [batch, seq, vocab] logits.

``chunked_causal_lm_loss(hidden, head, labels, num_items_in_batch)`` equals
``ForCausalLMLoss(linear(hidden, head.weight, head.bias), labels, vocab, num_items_in_batch)``: the same
label shift (pad with -100, drop the first), the logits upcast to fp32, mean over the counted tokens or a
sum divided by ``num_items_in_batch`` (Trainer's gradient accumulation). Only rows whose label counts
are computed, a few hundred at a time; when a gradient is wanted, each chunk's gradient with respect to
``hidden`` is computed right away from the chunk's softmax (the loss is a sum over rows, so
d loss / d hidden is known up to the scalar that backward brings), so no logits survive the forward and
backward costs one multiply. The head must be frozen: its own gradient is not computed.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from surgeon.errors import AdapterError
from surgeon.passes.head import Head

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 23  # logits per chunk (32 MB of fp32; rows per chunk = this // vocabulary, GPT-2: 166)


def chunked_causal_lm_loss(hidden: torch.Tensor, head: Head, labels: torch.Tensor,
                           num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    if head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
        raise AdapterError("chunked loss: the output head is trainable; its gradient needs the full logits")
    shift = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1).to(hidden.device)
    rows = hidden.reshape(-1, hidden.shape[-1])
    if shift.numel() != rows.shape[0]:
        raise AdapterError(f"chunked loss: labels of shape {tuple(labels.shape)} do not match the hidden states "
                           f"{tuple(hidden.shape[:-1])}")
    keep = (shift != IGNORE_INDEX).nonzero().squeeze(1)
    targets = shift[keep]
    vocab = head.weight.shape[0]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise AdapterError(f"labels: token ids must be in [0, {vocab}) or {IGNORE_INDEX} (ignored); got "
                           f"{int(targets.min())}..{int(targets.max())}")
    want_grad = rows.requires_grad and torch.is_grad_enabled()
    total = _ChunkedLoss.apply(rows, keep, targets, head.weight, head.bias, want_grad)
    if num_items_in_batch is None:
        return total / keep.numel()  # cross_entropy's mean: 0/0 = nan when no label counts, as there
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class _ChunkedLoss(torch.autograd.Function):
    """Sum over kept rows of ``logsumexp(logits) - logits[target]`` (fp32), logits = linear(rows, W, b)."""

    @staticmethod
    def forward(ctx, rows, keep, targets, weight, bias, want_grad):
        step = max(1, CHUNK_ELEMENTS // weight.shape[0])
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        grad = torch.zeros_like(rows) if want_grad else None
        for start in range(0, keep.numel(), step):
            index, target = keep[start:start + step], targets[start:start + step, None]
            logits = F.linear(rows.index_select(0, index), weight, bias).float()
            picked = logits.gather(1, target)
            top = logits.amax(dim=1, keepdim=True)
            exp = logits.sub_(top).exp_()  # one pass over the chunk, in place of the logits
            norm = exp.sum(dim=1, keepdim=True)
            total += (norm.log() + top - picked).sum()  # logsumexp - logit[target], per row
            if grad is not None:
                probs = exp.div_(norm)  # softmax
                probs.scatter_add_(1, target, torch.full_like(picked, -1.0))
                grad.index_copy_(0, index, (probs.to(weight.dtype) @ weight).to(rows.dtype))
        ctx.save_for_backward(grad if grad is not None else torch.empty(0))
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None, None
