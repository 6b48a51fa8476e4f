"""Data-parallel LoRA training of the embedded tiny GPT-2 on the bundled text, on several processes.

    torchrun --standalone --nproc-per-node 2 examples/train_ddp.py --out runs/ddp
    torchrun --standalone --nproc-per-node 2 examples/train_ddp.py --fsdp --out runs/fsdp
    accelerate launch --multi_gpu --num_processes 2 examples/train_ddp.py --trainer --out runs/ddp-trainer

(``--multi_gpu`` is Accelerate's DDP launcher; without a GPU it runs on CPU with gloo.) Plain mode wraps the
surgeon model in ``DistributedDataParallel`` itself; ``--trainer`` hands it to ``transformers.Trainer``, which
wraps it the same way. Either way DDP synchronises only the adapter tensors: a surgeon model tells DDP to leave
its frozen base alone (no broadcast at start, no all-reduce), each rank loads the base itself, and rank 0's
adapter initialisation is broadcast. ``--fsdp`` shards the whole model with FSDP2's ``fully_shard`` instead:
each rank keeps half of every base tensor between steps. Each rank trains on its own slice of every batch; rank 0 prints progress
and writes the adapter (PEFT's files, as one process would).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

import surgeon
from surgeon.bundled import DEFAULT_DATA
from surgeon.hub import load_tokenizer
from surgeon.workflows.processes import settle_and_destroy, settle_and_exit
from surgeon.workflows.train import token_blocks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8, help="the global batch, split across the processes")
    parser.add_argument("--trainer", action="store_true", help="train with transformers.Trainer")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard over the whole model) instead of DDP")
    parser.add_argument("--out", default="runs/ddp")
    args = parser.parse_args()
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if args.batch_size % world:
        parser.error(f"--batch-size {args.batch_size} does not split across {world} processes")
    blocks = token_blocks(load_tokenizer("tiny-gpt2"), DEFAULT_DATA, 64)
    torch.manual_seed(0)
    model = surgeon.get_peft_model(surgeon.load_model("tiny-gpt2"), surgeon.LoraConfig(r=8, target_modules=["c_attn"]))
    if args.trainer:
        from transformers import Trainer, TrainingArguments  # deferred: only this mode needs Trainer

        data = [{"input_ids": b, "labels": b} for b in blocks]
        trainer = Trainer(model=model, train_dataset=data, args=TrainingArguments(
            output_dir=os.path.join(args.out, "trainer"), per_device_train_batch_size=args.batch_size // world,
            max_steps=args.steps, learning_rate=2e-3, logging_steps=10, save_strategy="no", report_to=[],
            use_cpu=not torch.cuda.is_available()))
        trainer.train()
        model.save_pretrained(args.out, is_main_process=trainer.is_world_process_zero())
        if dist.is_initialized():  # Trainer leaves the group up: end past teardown (settle_and_exit says why)
            settle_and_exit()
        return
    if world > 1:
        dist.init_process_group("gloo")
    if args.fsdp and world > 1:
        wrapped = fully_shard(model)  # the model as one unit (a surgeon model refuses a shard on one of its layers)
    else:
        wrapped = DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0))
    share = args.batch_size // world
    bar = tqdm(range(args.steps), disable=rank != 0, desc="train", unit="step")
    for step in bar:
        rows = order[(step * args.batch_size + torch.arange(args.batch_size)) % len(blocks)]
        mine = blocks[rows[rank * share:(rank + 1) * share]]
        loss = wrapped(input_ids=mine, labels=mine).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.save_pretrained(args.out, is_main_process=rank == 0)  # every rank calls it: under FSDP it gathers the adapter
    if rank == 0:
        print(f"wrote adapter to {args.out}")
    if world > 1:
        settle_and_destroy()  # a barrier first: gloo's destructor can otherwise hang (see its docstring)


if __name__ == "__main__":
    main()
