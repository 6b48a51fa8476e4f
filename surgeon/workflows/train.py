"""A plain training loop for ``surgeon train``: text file -> token blocks -> LoRA steps -> adapter; under a launcher,
one rank of data-parallel training (``surgeon.workflows.processes``)."""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from surgeon.errors import DataError, TrainingDiverged
from surgeon.workflows.processes import Ranks


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    steps: int = 150
    lr: float = 2e-3
    batch_size: int = 8
    seq_len: int = 128
    seed: int = 0


def check_vocab(blocks: torch.Tensor, vocab_size: int, path: Path) -> None:
    top = int(blocks.max())
    if top >= vocab_size:
        raise DataError(f"{path}: the tokenizer produces token id {top} but the model's vocab_size is {vocab_size}; "
                        "use the tokenizer saved with this model")


def token_blocks(tokenizer, path: Path, seq_len: int) -> torch.Tensor:
    """The file's tokens cut into ``[n, seq_len]`` blocks (the tail shorter than a block is dropped)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such data file; give a UTF-8 text file with --data") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    ids = tokenizer(text, return_attention_mask=False)["input_ids"]
    n = len(ids) // seq_len
    if n < 2:
        raise DataError(f"{path}: {len(ids)} tokens make fewer than 2 blocks of {seq_len}; give more text or a smaller --seq-len")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


@torch.no_grad()
def mean_loss(model, blocks: torch.Tensor, batch_size: int, ranks: Ranks = Ranks()) -> float:
    """The mean loss over ``blocks``; with several ranks each takes a contiguous part and the sums are combined."""
    was = model.training
    model.eval()
    per = -(-len(blocks) // ranks.world)
    mine = blocks[ranks.rank * per:(ranks.rank + 1) * per]
    total = 0.0
    for i in range(0, len(mine), batch_size):
        batch = mine[i:i + batch_size]
        total += model(input_ids=batch, labels=batch, skip_logits=True).loss.item() * len(batch)
    model.train(was)
    total, n = ranks.total(total, len(mine))
    return total / n


def train(model, train_blocks: torch.Tensor, eval_blocks: torch.Tensor, settings: TrainSettings, *, progress: bool = True,
          ranks: Ranks = Ranks()) -> dict:
    """AdamW with linear decay on ``model``'s trainable parameters; returns losses before and after. With several
    ranks, each steps on its share of every batch of ``settings.batch_size`` rows (the batch is global) in DDP."""
    share = ranks.share(settings.batch_size, "--batch-size")
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / max(settings.steps, 1))
    before = mean_loss(model, eval_blocks, settings.batch_size, ranks)
    stepper = ranks.wrap(model)
    model.train()
    bar = tqdm(range(settings.steps), desc="train", disable=not (progress and ranks.main), unit="step")
    for _ in bar:
        rows = [rng.randrange(len(train_blocks)) for _ in range(settings.batch_size)][share]
        batch = train_blocks[rows]
        loss = stepper(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        value = ranks.mean(loss).item()  # every rank sees the same value: all stop together if it diverged
        bar.set_postfix(loss=f"{value:.3f}")
        if not math.isfinite(value):
            raise TrainingDiverged(f"training diverged (loss={value}); try a smaller --lr")
    after = mean_loss(model, eval_blocks, settings.batch_size, ranks)
    return {"heldout_loss_before": before, "heldout_loss_after": after}
