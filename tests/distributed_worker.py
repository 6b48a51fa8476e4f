"""One rank of tests/test_distributed.py (run by torchrun, or alone as the 1-process reference).

python tests/distributed_worker.py OUT [--trainer | --fsdp]: trains a tiny Llama's LoRA adapter for 10 AdamW steps on a
fixed global batch of 4 rows, this rank's share of it (all 4 rows when alone), and writes OUT/rank{R}.json
(the loss of every step averaged over ranks, and what DDP synchronises) and, on rank 0, the adapter to OUT/adapter.
With --trainer, transformers.Trainer runs the same steps (it wraps the model in DDP itself, through Accelerate),
under torchrun or ``accelerate launch``. With --fsdp, our loop over ``fully_shard(model)`` (FSDP2) instead of DDP.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).parent))

import surgeon  # noqa: E402
from surgeon.workflows.processes import settle_and_destroy, settle_and_exit  # noqa: E402
from conftest import batch, make_base  # noqa: E402

STEPS, ROWS = 10, 4


def _model(rank: int):
    torch.manual_seed(rank)  # a different adapter init per rank: DDP must make rank 0's win
    return surgeon.get_peft_model(make_base("llama"), surgeon.LoraConfig(target_modules=["q_proj", "v_proj"],
                                                                         init_lora_weights="gaussian"))


class Rows(torch.utils.data.Dataset):
    def __init__(self, data: dict):
        self.data = data

    def __len__(self) -> int:
        return len(self.data["input_ids"])

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.data.items()}


def with_trainer(out: Path) -> None:
    from transformers import Trainer, TrainingArguments

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    model = _model(rank)
    args = TrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=ROWS // world,
                             max_steps=STEPS, learning_rate=1e-2, lr_scheduler_type="constant", weight_decay=0.0,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Rows(batch("llama", b=ROWS, s=9)))
    trainer.train()
    wrapped = trainer.model_wrapped
    ignored = getattr(wrapped, "parameters_to_ignore", None)
    synced = sorted(n for n, _ in model.named_parameters() if ignored is None or n not in ignored)
    model.save_pretrained(str(out / "adapter"), is_main_process=trainer.is_world_process_zero())
    (out / f"rank{rank}.json").write_text(json.dumps({
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e], "synced": synced if world > 1 else None,
        "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
        "wrapper": type(wrapped).__name__, "base_params": sum(1 for _ in model.base.parameters())}))
    if dist.is_initialized():  # Trainer leaves the group up: end past teardown (settle_and_exit says why)
        settle_and_exit()


def main(out: Path) -> None:
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    model = _model(rank)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    if "--fsdp" in sys.argv[2:]:
        model.train()
        if "--layers" in sys.argv[2:]:
            fully_shard(model.base.model.layers[0])
        wrapped = fully_shard(model)  # the same object, now an FSDPModule: rank 0's adapter init is broadcast
        synced = sorted(n for n, p in model.named_parameters() if p.requires_grad and isinstance(p, DTensor))
        shard_rows = {n: p.to_local().shape[0] for n, p in model.base.named_parameters() if isinstance(p, DTensor)}
    else:
        wrapped = DistributedDataParallel(model) if world > 1 else model
        synced = sorted(n for n, _ in wrapped.module.named_parameters() if n not in wrapped.parameters_to_ignore) if world > 1 else trainable
        shard_rows = {}
    data = batch("llama", b=ROWS, s=9)
    share = ROWS // world
    mine = {k: v[rank * share:(rank + 1) * share] for k, v in data.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    losses = []
    if "--fail" in sys.argv[2:] and rank == 1:
        raise RuntimeError("rank 1 fails on purpose before its first step")  # rank 0 waits in its first all-reduce
    for _ in range(STEPS):
        loss = wrapped(**mine).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        losses.append(mean.item())
    model.save_pretrained(str(out / "adapter"), is_main_process=rank == 0)
    (out / f"rank{rank}.json").write_text(json.dumps({"losses": losses, "synced": synced, "trainable": trainable,
                                                       "base_params": sum(1 for _, p in model.base.named_parameters()),
                                                       "shard_rows": shard_rows}))
    if world > 1:
        settle_and_destroy()  # a barrier first: gloo's destructor can otherwise hang (see its docstring)


if __name__ == "__main__":
    (with_trainer if "--trainer" in sys.argv[2:] else main)(Path(sys.argv[1]))
