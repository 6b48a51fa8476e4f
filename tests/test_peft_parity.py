"""Against real PEFT on the same base: parameter counts, targets, losses in a loop and under Trainer."""

from __future__ import annotations

import peft
import pytest
import torch
from transformers import Trainer, TrainingArguments

import surgeon
from tests.conftest import ARCHS, batch, loss_curve, make_base


def twins(name: str, **cfg):
    """A surgeon model and a PEFT model of the same base with identical adapter weights."""
    _, targets, task = ARCHS[name]
    cfg = dict(r=4, lora_alpha=8, target_modules=targets, task_type=task, **cfg)
    ours = surgeon.get_peft_model(make_base(name), surgeon.LoraConfig(**cfg))
    theirs = peft.get_peft_model(make_base(name), peft.LoraConfig(**cfg))
    copy_peft_weights(theirs, ours)
    return ours, theirs


@torch.no_grad()
def copy_peft_weights(theirs, ours) -> None:
    """PEFT's initial A, B (and modules_to_save copies) into ours, by PEFT key."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(theirs)
    own = ours.state_dict(keep_vars=True)
    assert set(state) == set(own)
    for key, value in state.items():
        own[key].copy_(value)


@pytest.mark.parametrize("name", list(ARCHS))
def test_trainable_parameter_line_equals_peft(name, capsys):
    ours, theirs = twins(name)
    ours.print_trainable_parameters()
    theirs.print_trainable_parameters()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("trainable params")]
    assert len(lines) == 2 and lines[0] == lines[1]


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_plain_loop_loss_curve_equals_peft(name):
    ours, theirs = twins(name, lora_dropout=0.0, modules_to_save=None)
    losses = [loss_curve(model, name, steps=5, pad_left=2) for model in (ours, theirs)]
    assert losses[0] == pytest.approx(losses[1], abs=2e-5), losses


class _Rows(torch.utils.data.Dataset):
    def __init__(self, name, n=12):
        self.rows = []
        for i in range(n):
            b = batch(name, b=1, s=8 + (i % 3), seed=100 + i)
            row = {k: v[0] for k, v in b.items()}
            if "labels" in row and row["labels"].dim() == 1 and name != "bert":
                row["labels"][: i % 4] = -100  # uneven token counts, so num_items_in_batch matters
            self.rows.append(row)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _collate(rows):
    width = max(r["input_ids"].shape[0] for r in rows)
    out = {}
    for key in rows[0]:
        if rows[0][key].dim() == 0:
            out[key] = torch.stack([r[key] for r in rows])
            continue
        fill = -100 if key == "labels" else 0
        out[key] = torch.stack([torch.nn.functional.pad(r[key], (0, width - r[key].shape[0]), value=fill) for r in rows])
    return out


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_trainer_with_gradient_accumulation_equals_peft(name, tmp_path):
    ours, theirs = twins(name)
    curves = []
    for tag, model in (("ours", ours), ("peft", theirs)):
        args = TrainingArguments(output_dir=str(tmp_path / tag), per_device_train_batch_size=2, gradient_accumulation_steps=3,
                                 max_steps=4, learning_rate=5e-3, logging_steps=1, report_to=[], save_strategy="no",
                                 seed=0, data_seed=0, use_cpu=True, disable_tqdm=True, remove_unused_columns=False)
        trainer = Trainer(model=model, args=args, train_dataset=_Rows(name), eval_dataset=_Rows(name, 4), data_collator=_collate)
        trainer.train()
        curves.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
        metrics = trainer.evaluate()
        curves[-1].append(metrics["eval_loss"])
    assert curves[0] == pytest.approx(curves[1], abs=1e-4), curves


def test_trainer_save_model_writes_adapter_weights(tmp_path):
    from safetensors.torch import load_file

    ours, _ = twins("gpt2")
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, disable_tqdm=True,
                             per_device_train_batch_size=2, remove_unused_columns=False)
    trainer = Trainer(model=ours, args=args, train_dataset=_Rows("gpt2", 2), data_collator=_collate)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert set(saved) == set(ours.state_dict())
    assert all(k.startswith("base_model.model.") and "lora_" in k for k in saved)


@pytest.mark.parametrize("target_modules", [["c_attn"], "all-linear", r".*\.h\.1\..*c_(fc|proj)"])
def test_targets_equal_peft(target_modules):
    ours, theirs = (surgeon.get_peft_model(make_base("gpt2"), surgeon.LoraConfig(target_modules=target_modules)),
                    peft.get_peft_model(make_base("gpt2"), peft.LoraConfig(target_modules=target_modules)))
    assert set(ours.state_dict()) == set(peft.utils.get_peft_model_state_dict(theirs))


def test_accelerate_prepare_and_train():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    ours, _ = twins("llama")
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    loader = torch.utils.data.DataLoader(_Rows("llama", 8), batch_size=4, collate_fn=_collate)
    model, optimizer, loader = accelerator.prepare(ours, optimizer, loader)
    model.train()
    losses = []
    for _ in range(3):
        for batch_ in loader:
            loss = model(**batch_).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert set(accelerator.unwrap_model(model).state_dict()) == set(ours.adapter_state_dict())
