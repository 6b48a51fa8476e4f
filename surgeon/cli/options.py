"""Options and argument helpers the commands share (the LoRA options, --bits, finite numbers, OUT checks)."""

from __future__ import annotations

import math
from pathlib import Path

import click

from surgeon.bundled import BUILTIN
from surgeon.config import MAX_RANK, LoraConfig, TaskType
from surgeon.ia3_config import IA3Config
from surgeon.prompt_config import PromptTuningConfig
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
    fn = click.option("--method", type=click.Choice(["lora", "ia3", "prompt"]), default="lora", show_default=True,
                      help="ia3: PEFT's IA3Config, a learned vector per target (its default targets and feed-forward "
                           "modules per architecture); prompt: prompt tuning (--virtual-tokens, --init-text); "
                           "-r/--alpha/--dropout/--dora are LoRA's.")(fn)
    fn = click.option("--virtual-tokens", type=click.IntRange(1), default=None,
                      help="--method prompt: the number of virtual tokens (default 20).")(fn)
    fn = click.option("--init-text", default=None,
                      help="--method prompt: start the virtual tokens from this text's token embeddings (PEFT's TEXT).")(fn)
    return fn


def lora_config(base_name, *, targets, rank, alpha, dropout, all_linear, dora, method, virtual_tokens, init_text):
    """The adapter recipe the CLI's method options describe; an option of another method is refused by name."""
    target_modules = "all-linear" if all_linear else (list(targets) or None)
    given = {"--rank": rank != 8, "--alpha": alpha != 16.0, "--dropout": dropout != 0.0, "--dora": dora,
             "--target": bool(targets), "--all-linear": all_linear, "--virtual-tokens": virtual_tokens is not None,
             "--init-text": init_text is not None}
    takes = {"lora": {"--rank", "--alpha", "--dropout", "--dora", "--target", "--all-linear"},
             "ia3": {"--target", "--all-linear"}, "prompt": {"--virtual-tokens", "--init-text"}}[method]
    wrong = [o for o, on in given.items() if on and o not in takes]
    if wrong:
        raise click.UsageError(f"{', '.join(wrong)}: not an option of --method {method} (it takes "
                               f"{', '.join(sorted(takes))})")
    if method == "prompt":
        return PromptTuningConfig(num_virtual_tokens=virtual_tokens or 20, task_type=TaskType.CAUSAL_LM,
                                  prompt_tuning_init="TEXT" if init_text else "RANDOM", prompt_tuning_init_text=init_text,
                                  tokenizer_name_or_path=base_name if init_text else None,
                                  base_model_name_or_path=base_name)
    if method == "ia3":
        return IA3Config(target_modules=target_modules, task_type=TaskType.CAUSAL_LM, base_model_name_or_path=base_name)
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                      task_type=TaskType.CAUSAL_LM, base_model_name_or_path=base_name, use_dora=dora)


def prompt_line(config) -> str:
    return (f"prompt tuning: {config.num_virtual_tokens} virtual tokens of {config.token_dim} values "
            f"({config.prompt_tuning_init}) in front of every input")


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

