"""Options and argument helpers the commands share (the LoRA options, --bits, finite numbers, OUT checks)."""

from __future__ import annotations

import math
from pathlib import Path

import click

from surgeon.bundled import BUILTIN
from surgeon.config import MAX_RANK, LoraConfig, TaskType
from surgeon.ia3_config import IA3Config
from surgeon.outputs import check_name, check_out, refuse_model_dir, write_dir_atomically


def finite(low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False):
    """A click callback: a finite float within the bounds (click's FloatRange lets NaN through)."""

    def check(ctx, param, value):
        if value is None:
            return value
        bad = not math.isfinite(value) or (low is not None and (value < low or low_open and value == low)) or \
            (high is not None and (value > high or high_open and value == high))
        if bad:
            lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
            hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
            raise click.BadParameter(f"{value!r}: give a finite number {' and '.join(x for x in (lo, hi) if x)}")
        return value

    return check


def lora_options(fn):
    fn = click.option("-t", "--target", "targets", multiple=True, help="Module name (suffix) to adapt; repeat. Default: the model family's usual ones.")(fn)
    fn = click.option("-r", "--rank", default=8, show_default=True, type=click.IntRange(1, MAX_RANK), help="LoRA rank r.")(fn)
    fn = click.option("--alpha", default=16.0, show_default=True, type=float, callback=finite(0, low_open=True),
                      help="lora_alpha (scale = alpha / r).")(fn)
    fn = click.option("--dropout", default=0.0, show_default=True, type=float, callback=finite(0, 1, high_open=True),
                      help="lora_dropout, in [0, 1).")(fn)
    fn = click.option("--all-linear", is_flag=True, help="Target every linear layer but the output layer.")(fn)
    fn = click.option("--dora", is_flag=True, help="DoRA (use_dora): a trained magnitude per output besides A and B.")(fn)
    fn = click.option("--method", type=click.Choice(["lora", "ia3"]), default="lora", show_default=True,
                      help="ia3: PEFT's IA3Config, a learned vector per target (its default targets and feed-forward "
                           "modules per architecture); -r/--alpha/--dropout/--dora are LoRA's.")(fn)
    return fn


def lora_config(targets, rank, alpha, dropout, all_linear, base_name, dora=False, method="lora"):
    target_modules = "all-linear" if all_linear else (list(targets) or None)
    if method == "ia3":
        lora_only = [f"--{n}" for n, v, d in (("rank", rank, 8), ("alpha", alpha, 16.0), ("dropout", dropout, 0.0),
                                               ("dora", dora, False)) if v != d]
        if lora_only:
            raise click.UsageError(f"{', '.join(lora_only)}: LoRA options; --method ia3 learns one vector per target "
                                   "and takes none of them")
        return IA3Config(target_modules=target_modules, task_type=TaskType.CAUSAL_LM, base_model_name_or_path=base_name)
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                      task_type=TaskType.CAUSAL_LM, base_model_name_or_path=base_name, use_dora=dora)


def targets_table(found, config=None, model_type: str | None = None) -> str:
    rows = [("module", "kind", "in", "out", "r", "alpha", "status")]
    if isinstance(config, IA3Config):  # a vector per target, on its input (feed-forward) or its output
        rows += [(t.path, t.kind, str(t.in_features), str(t.out_features), "-", "-",
                  "IA3 on the " + ("input" if config.is_feedforward(t.path, model_type) else "output"))
                 for t in found.targets]
    else:
        rows += [(t.path, t.kind, str(t.in_features), str(t.out_features), str(t.r), f"{t.alpha:g}", "LoRA")
                 for t in found.targets]
    rows += [(s.path, s.kind, str(s.in_features), str(s.out_features), "-", "-", f"skipped: {s.reason}") for s in found.skipped]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def bits_option(fn):
    return click.option("--bits", type=click.Choice(["4", "8"]), default=None,
                        help="Load the base quantized (bitsandbytes; 4 = nf4 with double quantization), QLoRA.")(fn)



def input_dir(model: str) -> Path | None:
    """MODEL's directory (built-in or local) when there is one: an input no write may destroy."""
    return BUILTIN[model] if model in BUILTIN else (Path(model) if Path(model).exists() else None)


def check_adapter_out(output: str, inputs: list, force: bool) -> None:
    """Refuse, before any work, an adapter OUT that is a model directory, an input, or exists without --force."""
    refuse_model_dir(Path(output))
    check_out(output, inputs, force=force)


def write_adapter(peft_model, output: str, inputs: list, force: bool) -> None:
    write_dir_atomically(output, peft_model.save_pretrained, force=force, inputs=inputs)


def base_name(model: str) -> str:
    return model if model in BUILTIN else str(Path(model).resolve())



def adapter_names(adapter_dirs, names):
    names = [check_name(n, "--name") for n in names] or [check_name(Path(d).resolve().name, f"the name of {d}")
                                                       for d in adapter_dirs]
    if len(names) != len(adapter_dirs):
        raise click.BadParameter(f"{len(names)} --name values for {len(adapter_dirs)} adapter directories")
    if len(set(names)) != len(names):
        raise click.BadParameter(f"adapter names {names} repeat; give each one with --name")
    return names



def adapter_pairs(values) -> dict[str, str]:
    pairs = {}
    for value in values:
        name, sep, directory = value.partition("=")
        if not sep or not name or not directory:
            raise click.BadParameter(f"{value!r}: give NAME=PEFT_DIR (the adapter's name in the export, its source "
                                     "directory)", param_hint="--adapter")
        pairs[name] = directory
    return pairs

