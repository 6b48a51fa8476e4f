"""``surgeon`` command line: the only place that prints or exits.

Each command imports the stages it runs inside its body: ``surgeon --help`` and a usage error answer
in a fraction of a second instead of paying for torch and transformers (~3 s).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import click

from surgeon.cli.options import (
    adapter_names,
    adapter_pairs,
    base_name,
    bits_option,
    check_adapter_out,
    finite,
    input_dir,
    lora_config,
    lora_options,
    prompt_line,
    targets_table,
    write_adapter,
)
from surgeon.cli.running import Surgeon, friendly, quiet
from surgeon.outputs import atomic_write_bytes, check_file_target, check_out


@click.group(cls=Surgeon, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="surgeon")
def main() -> None:
    """LoRA as compiler passes: capture, inject, train, fold, export."""


@main.command()
@click.argument("model")
@lora_options
@click.option("--dry-run", is_flag=True, help="Print the target table and the parameter count; write nothing.")
@click.option("-o", "--output", type=click.Path(file_okay=False), help="Write the initialised adapter here.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (never a model directory or an input).")
@bits_option
@friendly
def inject(model, dry_run, output, bits, force, **recipe):
    """Show where LoRA goes in MODEL (a directory or built-in name) and write the initial adapter."""
    quiet()
    from surgeon.matching import match
    from surgeon.model import get_peft_model, trainable_parameters_line
    from surgeon.quant import load_base

    if output and not dry_run:
        check_adapter_out(output, [input_dir(model)], force)
    base = load_base(model, bits)
    config = lora_config(base_name(model), **recipe)
    peft_model = get_peft_model(base, config)
    if config.peft_type == "PROMPT_TUNING":
        click.echo(prompt_line(peft_model.peft_config["default"]))  # token_dim filled from the base
    else:
        found = match(peft_model.graphs.any(), config)
        click.echo(targets_table(found, config, peft_model.graphs.any().meta["surgeon"].model_type))
    click.echo(trainable_parameters_line(*peft_model.get_nb_trainable_parameters()))
    if output and not dry_run:
        write_adapter(peft_model, output, [input_dir(model)], force)
        click.echo(f"wrote adapter to {output}")


@main.command()
@click.argument("model", required=False, default=None)
@click.option("--data", type=click.Path(dir_okay=False), help="UTF-8 text to fine-tune on. Default: the bundled text.")
@click.option("--heldout", type=click.Path(dir_okay=False), help="Held-out text for the before/after loss. Default: bundled, or the last 10% of --data.")
@lora_options
@click.option("--steps", default=150, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=2e-3, show_default=True, type=float, callback=finite(0, low_open=True))
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1))
@click.option("--seq-len", default=128, show_default=True, type=click.IntRange(2))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1))
@click.option("--eval-blocks", "eval_blocks_n", default=64, show_default=True, type=click.IntRange(1),
              help="Held-out blocks for the before/after loss.")
@click.option("-o", "--output", default="runs/adapter", show_default=True, type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Replace OUT if it exists (never a model directory or an input).")
@bits_option
@click.option("--compile", "compile_graphs", is_flag=True,
              help="torch.compile the injected graph (inductor): a slow first step, faster steps after.")
@friendly
def train(model, data, heldout, steps, lr, batch_size, seq_len, seed, eval_blocks_n, output, force, bits,
          compile_graphs, **recipe):
    """Fine-tune a LoRA adapter on MODEL (default: the embedded tiny GPT-2) and write it.

    Under torchrun or accelerate launch, each process trains on its share of every batch (--batch-size is the
    global batch) and rank 0 shows progress and writes OUT."""
    quiet()
    import torch

    from surgeon.bundled import BUILTIN_TARGETS, DEFAULT_DATA, DEFAULT_HELDOUT, DEFAULT_MODEL
    from surgeon.hub import load_tokenizer
    from surgeon.model import get_peft_model, trainable_parameters_line
    from surgeon.quant import load_base
    from surgeon.workflows.processes import process_group
    from surgeon.workflows.train import TrainSettings, check_vocab, token_blocks
    from surgeon.workflows.train import train as run

    model = model or DEFAULT_MODEL
    inputs = [input_dir(model), data, heldout]
    check_adapter_out(output, inputs, force)
    if recipe["method"] == "lora" and not (recipe["targets"] or recipe["all_linear"]):
        recipe["targets"] = BUILTIN_TARGETS.get(model, ())
    settings = TrainSettings(steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len, seed=seed)
    tokenizer = load_tokenizer(model)
    blocks = token_blocks(tokenizer, Path(data) if data else DEFAULT_DATA, seq_len)
    if heldout or not data:
        eval_blocks = token_blocks(tokenizer, Path(heldout) if heldout else DEFAULT_HELDOUT, seq_len)
    else:
        cut = max(1, len(blocks) // 10)
        blocks, eval_blocks = blocks[:-cut], blocks[-cut:]
    eval_blocks = eval_blocks[:max(1, eval_blocks_n)]
    torch.manual_seed(seed)
    base = load_base(model, bits)
    for b, source in ((blocks, data or DEFAULT_DATA), (eval_blocks, heldout or data or DEFAULT_HELDOUT)):
        check_vocab(b, base.config.vocab_size, Path(source))
    peft_model = get_peft_model(base, lora_config(base_name(model), **recipe),
                                compile=compile_graphs)
    with process_group() as ranks:
        ranks.share(batch_size, "--batch-size")  # refused before any work
        say = click.echo if ranks.main else (lambda _: None)
        say(trainable_parameters_line(*peft_model.get_nb_trainable_parameters()))
        each = f" over {ranks.world} processes ({batch_size // ranks.world} rows of each batch)" if ranks.world > 1 else ""
        say(f"data: {len(blocks)} training blocks, {len(eval_blocks)} held-out blocks of {seq_len} tokens{each}")
        result = run(peft_model, blocks, eval_blocks, settings, ranks=ranks)
        before, after = result["heldout_loss_before"], result["heldout_loss_after"]
        say(f"held-out loss: {before:.4f} -> {after:.4f} ({100 * (after - before) / before:+.1f}%)")
        if ranks.main:
            write_adapter(peft_model, output, inputs, force)
        say(f"wrote adapter to {output}")




@main.command()
@click.argument("model")
@click.argument("adapter_dirs", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Directory for the merged checkpoint.")
@click.option("--weights", help="Comma-separated weight per adapter (default 1 each); several adapters are summed exactly.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="Cast the merged model (default: as loaded).")
@click.option("--format", "fmt", type=click.Choice(["hf", "onnx"]), default="hf", show_default=True,
              help="hf: a transformers checkpoint; onnx: a merged ONNX export (as `surgeon export --merged`).")
@click.option("--kv-cache", is_flag=True, help="With --format onnx: a decoder with KV cache inputs/outputs (for generation).")
@click.option("--bits", type=click.Choice(["4", "8"]), default=None,
              help="The adapter was trained on a 4/8-bit base: merge into the dequantized weights (a float checkpoint).")
@click.option("--requantize", is_flag=True,
              help="With --bits: quantize the merged model again (bitsandbytes checkpoint) and print the error it adds.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@friendly
def fold(model, adapter_dirs, output, weights, dtype, fmt, kv_cache, bits, requantize, force):
    """Fold ADAPTER_DIRS into MODEL's weights and write a checkpoint AutoModel*.from_pretrained loads."""
    quiet()
    from surgeon.workflows.checkpoint import fold_checkpoint, fold_onnx

    try:
        parsed = [float(w) for w in weights.split(",")] if weights else None
    except ValueError:
        parsed = [math.nan]
    if parsed is not None and not all(math.isfinite(w) for w in parsed):
        raise click.BadParameter(f"--weights {weights!r}: give finite numbers separated by commas, e.g. 0.7,0.3")
    if fmt == "onnx":
        if bits:
            raise click.BadParameter("--bits with --format onnx is not supported yet; fold to a float checkpoint "
                                     "first (surgeon fold MODEL ADAPTER --bits N -o MERGED), then export MERGED")
        if dtype:
            raise click.BadParameter("--dtype applies to --format hf; ONNX exports are fp32")
        out = fold_onnx(model, adapter_dirs, output, weights=parsed, force=force, source=base_name(model),
                        kv_cache=kv_cache)
        click.echo(f"wrote merged ONNX model to {out}")
        return
    if kv_cache:
        raise click.BadParameter("--kv-cache applies to --format onnx")
    if requantize and not bits:
        raise click.BadParameter("--requantize needs --bits 4 or 8 (the width to quantize the merged model to)")

    def show(report):
        click.echo(f"re-quantized {report['layers']} layers to {report['bits']} bits: relative weight error "
                   f"mean {report['mean_relative_error']:.4f}, max {report['max_relative_error']:.4f} "
                   f"({report['worst_layer']}); the float merge is exact, this is what quantizing it again costs")

    out = fold_checkpoint(model, adapter_dirs, output, weights=parsed, force=force, dtype=dtype,
                          bits=int(bits) if bits else None, requantize=requantize, on_report=show)
    click.echo(f"wrote merged checkpoint to {out}")



@main.group()
def bank():
    """Adapter banks (exports made with `surgeon export ... --bank`)."""


@bank.command("add")
@click.argument("export_dir", type=click.Path(file_okay=False))
@click.argument("adapter_dir", type=click.Path(file_okay=False))
@click.option("--name", default=None, help="The adapter's name in the bank (default: the directory's name).")
@friendly
def bank_add(export_dir, adapter_dir, name):
    """Add the PEFT adapter in ADAPTER_DIR to the bank in EXPORT_DIR as a new slot (model.onnx is not rewritten)."""
    quiet()
    from surgeon.onnx.bank import add_to_bank

    name = name or Path(adapter_dir).resolve().name
    entry = add_to_bank(export_dir, adapter_dir, name)
    click.echo(f"added {name} to {export_dir} as slot {len(entry['slots']) - 1} (slots: {entry['slots']})")


@main.command()
@click.argument("model")
@click.argument("adapter_dirs", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Export directory.")
@click.option("--name", "names", multiple=True, help="Adapter name per directory (default: the directory's name).")
@click.option("--merged", is_flag=True, help="Fold the (single) adapter into the weights instead of switchable inputs.")
@click.option("--kv-cache", is_flag=True,
              help="Export a decoder with past_key_values.* inputs and present.* outputs, for `surgeon generate`.")
@click.option("--bits", type=click.Choice(["4", "8"]), default=None,
              help="The adapters were trained on a 4/8-bit base: export the base with ONNX Runtime's MatMulNBits.")
@click.option("--bank", is_flag=True,
              help="An adapter bank: one batch mixes adapters, each row picking its own through the adapter_ids input.")
@click.option("--int4", is_flag=True,
              help="The base's linears and head as 4-bit MatMulNBits (ONNX Runtime's quantizer); adapters stay float.")
@click.option("--block-size", default=32, show_default=True, type=click.Choice(["16", "32", "64", "128"]),
              help="With --int4: weights per 4-bit block (one scale each).")
@click.option("--int4-method", default="rtn", show_default=True, type=click.Choice(["rtn", "hqq", "gptq"]),
              help="With --int4: round-to-nearest or HQQ (gptq is refused: it needs Intel Neural Compressor).")
@click.option("--accuracy-level", default=4, show_default=True, type=click.Choice(["0", "1", "2", "3", "4"]),
              help="With --int4: MatMulNBits' compute type (4: int8 activations, fastest on CPU; 1: fp32).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@friendly
def export(model, adapter_dirs, output, names, merged, kv_cache, bits, bank, int4, block_size, int4_method,
           accuracy_level, force):
    """Export MODEL with ADAPTER_DIRS to ONNX: adapter weights as inputs + .onnx_adapter files."""
    quiet()
    from surgeon.adapters import read_adapter_dir
    from surgeon.model import SurgeonModel
    from surgeon.onnx.export import export_onnx
    from surgeon.onnx.int4 import Int4Spec
    from surgeon.quant import load_base

    spec = Int4Spec(int4_method, int(block_size), int(accuracy_level)) if int4 else None  # refused before any work
    names = adapter_names(adapter_dirs, names)
    check_out(output, [input_dir(model), *adapter_dirs], force=force)

    config, _ = read_adapter_dir(adapter_dirs[0])
    base = load_base(model, bits, task=config.task_type.value if config.task_type else None)
    peft_model = SurgeonModel.from_pretrained(base, adapter_dirs[0], adapter_name=names[0])
    for name, directory in zip(names[1:], adapter_dirs[1:]):
        peft_model.load_adapter(directory, adapter_name=name)
    out = export_onnx(peft_model, output, names, merged=merged, force=force,
                      source=base_name(model),
                      adapter_sources=dict(zip(names, adapter_dirs)), kv_cache=kv_cache, bank=bank, int4=spec)
    what = f"merged adapter {names[0]}" if merged else f"{'adapter bank' if bank else 'adapters'} {', '.join(names)}"
    int4_what = f", int4 {spec.method} blocks of {spec.block_size}" if spec else ""
    click.echo(f"wrote {out} ({what}{', with KV cache' if kv_cache else ''}{int4_what})")


@main.command()
@click.argument("model")
@click.option("-a", "--adapter", "adapters", multiple=True,
              help="For an export directory: an adapter name in it; for a model: a PEFT adapter directory. Repeat to "
                   "compare several; none: the base model.")
@click.option("--base", "with_base", is_flag=True, help="Also generate with no adapter (the base model), to compare.")
@click.option("-p", "--prompt", required=True, help="Text to continue.")
@click.option("-n", "--max-new-tokens", default=40, show_default=True, type=click.IntRange(1))
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", default=1.0, show_default=True, type=float)
@click.option("--top-k", default=0, show_default=True, type=int, help="Keep the k most likely tokens (0: all).")
@click.option("--top-p", default=1.0, show_default=True, type=float, help="Nucleus sampling mass.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--bits", type=click.Choice(["4", "8"]), default=None, help="A torch MODEL: load it 4/8-bit (QLoRA adapters).")
@friendly
def generate(model, adapters, with_base, prompt, max_new_tokens, sample, temperature, top_k, top_p, seed, bits):
    """Continue PROMPT with MODEL (a model or an `surgeon export --kv-cache` directory), streaming the text."""
    quiet()
    from surgeon.workflows.textgen import generate_text

    if not prompt:
        raise click.BadParameter("the prompt is empty; give the text to continue", param_hint="--prompt")

    runs = list(adapters) or [None]
    if with_base and None not in runs:
        runs.insert(0, None)
    sampling = {"do_sample": sample, "temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
    for adapter in runs:
        if len(runs) > 1:
            click.echo(f"--- {adapter or 'base (no adapter)'} ---")
        generate_text(model, adapter, prompt, max_new_tokens, sampling, echo=lambda text: click.echo(text, nl=False),
                      bits=int(bits) if bits else None)
        click.echo()



@main.command()
@click.argument("out_dir", type=click.Path())
@click.option("--reference", help="Torch model to compare with (default: the source named in the manifest).")
@click.option("-a", "--adapter", "adapter_sources", multiple=True, metavar="NAME=DIR",
              help="The source PEFT directory of adapter NAME (default: the one recorded at export). Repeat.")
@click.option("--strict", is_flag=True, help="A comparison that cannot be made (no source, no reference) fails.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write a machine-readable report here.")
@click.option("--atol", default=1e-4, show_default=True, type=float, callback=finite(0), help="Max |ORT - torch| on logits.")
@friendly
def check(out_dir, reference, adapter_sources, strict, json_path, atol):
    """Check an export for CI: exit 0 pass, 1 a check failed, 2 bad invocation (not an export, bad options)."""
    quiet()
    from surgeon.workflows.checks import run_checks

    target = check_file_target(Path(json_path)) if json_path else None  # refused before any check runs
    report = run_checks(out_dir, reference=reference, atol=atol, adapters=adapter_pairs(adapter_sources),
                        strict=strict)
    click.echo(report.text())
    if target:
        atomic_write_bytes(target, report.to_json().encode())
    sys.exit(0 if report.passed else 1)


@main.command()
@click.argument("adapter_dir", type=click.Path())
@friendly
def inspect(adapter_dir):
    """Print an adapter's config, its targets (rank, alpha, norm of scale*B@A) and its file size."""
    from surgeon.workflows.inspect import describe_adapter

    click.echo(describe_adapter(adapter_dir))


