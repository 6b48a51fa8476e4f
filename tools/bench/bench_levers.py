"""python tools/bench/bench_levers.py --model llama

Prints, for one model, a table of training-step variants (PEFT eager, surgeon as it is, and
surgeon with one prototype lever each), with the median step seconds (wall and CPU), the ratio
to PEFT eager, the first-step (compile) seconds and the last loss. With ``--memory`` each variant
instead runs in its own subprocess and the table gives its peak RSS while training (MB) and the
ratio to PEFT eager, and the step's peak live tensor MB (allocator-independent) and its ratio.
Progress goes to stderr.

Levers are prototyped here by patching surgeon from the outside (surgeon/ is not edited):

- ``addmm``:   the LoRA branch as one ``addmm(base_out, x @ A^T, B^T, alpha=scale)`` instead of
               ``base_out + (x @ A^T) @ B^T * scale`` (one fewer [tokens, out] temporary);
- ``causal``:  attention without the materialised [B, 1, S, S] mask: SDPA(attn_mask=None,
               is_causal=True), what eager transformers does when the attention_mask is all ones
               (valid only then: a real pass must dispatch on ``attention_mask.all()``);
- ``compile``: ``torch.compile`` (inductor) of each injected graph in ``model.graphs``;
- ``compile-aot``: ``torch.compile(backend="aot_eager_decomp_partition")``: AOTAutograd's
               min-cut partitioner (recomputes cheap pointwise ops in backward), eager kernels;
- ``compile-loss``: ``torch.compile`` of graph + loss together (the cross-entropy fuses with the
               graph; surgeon now computes the loss outside the graph, eagerly);
- ``chunked-ce``: eager; the loss as a chunked cross-entropy whose backward recomputes the
               softmax per 128 rows into one gradient buffer (no full-size log-softmax kept).

Step times are measured with the variants in ONE process, interleaved step by step (each
round in a new seeded random order), so that load from other processes hits every variant alike; the ratio column is what to
read on a busy machine (with ``--threads 1`` the CPU-time ratio is the steadiest: no thread
waits for a descheduled sibling). Options: ``--variants`` (comma list), ``--steps 8``, ``--warmup 2``,
``--threads``, ``--memory``, ``--quick``. A variant written ``NAME#2`` is a second copy of NAME
(an A/A pair shows the noise floor).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import types

import harness as h

VARIANTS = ("peft", "surgeon", "surgeon+addmm", "surgeon+causal", "surgeon+chunked-ce", "surgeon+compile",
            "surgeon+compile-aot", "surgeon+compile-loss", "peft+compile")


# ---- levers ---------------------------------------------------------------------------------
def addmm_forward(self, x, base_out):
    """``LoraLayer.forward`` with each active branch as one addmm."""
    import torch

    if not self.enabled:
        return base_out
    out = base_out
    for name in self.active:
        ad = self.adapters[name] if name in self.adapters else None
        if ad is None:
            continue
        if ad.kind != "embedding" and x.dtype == ad.lora_A.dtype == out.dtype:
            x2 = ad.dropout(x).reshape(-1, x.shape[-1])
            out = torch.addmm(out.reshape(-1, out.shape[-1]), x2 @ ad.lora_A.t(), ad.lora_B.t(),
                              alpha=ad.scale).view(out.shape)
        else:
            out = out + ad.delta(x).to(base_out.dtype)
    return out


def causal_graph(gm):
    """A copy of ``gm`` whose attention calls take no mask and set ``is_causal=True``."""
    import copy

    import torch
    from surgeon.graphs import copy_graph
    from surgeon.capturing.dropout import AttentionDropout

    new = copy_graph(gm)
    for node in list(new.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.scaled_dot_product_attention.default:
            node.args, node.kwargs = node.args[:3], {**node.kwargs, "is_causal": True}
        elif node.op == "call_module" and isinstance(new.get_submodule(node.target), AttentionDropout):
            module = copy.copy(new.get_submodule(node.target))
            module.is_causal = True
            new.add_submodule(node.target, module)
            node.args = node.args[:3]
    new.graph.eliminate_dead_code()
    new.graph.lint()
    new.recompile()
    return new


def build_variant(variant: str, name: str, quick: bool, batch: dict):
    """The model for ``variant``: PEFT or surgeon, with its lever applied."""
    import torch

    tool, _, lever = variant.split("#")[0].partition("+")  # "surgeon#2": a second copy, for an A/A check
    lib = __import__(tool)
    model = lib.get_peft_model(h.build_base(name, quick), lib.LoraConfig(task_type="CAUSAL_LM", **h.lora_kwargs(name)))
    model.train()
    if tool == "peft":
        if lever == "compile":
            inner = model.base_model.model
            inner.forward = torch.compile(inner.forward, dynamic=False)
        return model
    call = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    model.graph_for(**call)
    graphs = model.graphs.graphs  # signature -> injected graph
    if lever == "addmm":
        for module in model.adapter_modules.modules():
            if type(module).__name__ == "LoraLayer":
                module.forward = types.MethodType(addmm_forward, module)
    elif lever == "causal":
        for key in graphs:
            graphs[key] = causal_graph(graphs[key])
    elif lever in ("compile", "compile-aot"):
        backend = "inductor" if lever == "compile" else "aot_eager_decomp_partition"
        for key in graphs:
            graphs[key] = torch.compile(graphs[key], backend=backend, dynamic=False)
    elif lever in ("compile-loss", "chunked-ce"):
        graph = graphs[next(iter(graphs))]
        loss_fn = hf_loss(model) if lever == "compile-loss" else chunked_cross_entropy
        run = logits_and_loss(graph, loss_fn)
        model.forward = types.MethodType(forward_with(torch.compile(run, dynamic=False) if lever == "compile-loss" else run), model)
    elif lever:
        raise SystemExit(f"bench_levers: error: unknown lever {lever!r} in {variant!r}")
    return model


def hf_loss(model):
    base = model.base
    return lambda logits, labels: base.loss_function(logits=logits, labels=labels, vocab_size=base.config.vocab_size)


def logits_and_loss(graph, loss_fn):
    def run(input_ids, attention_mask, labels):
        logits = graph(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return logits, loss_fn(logits, labels)
    return run


def forward_with(run):
    """A SurgeonModel.forward for (input_ids, attention_mask, labels) that calls ``run`` (graph + loss)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    def forward(self, input_ids=None, attention_mask=None, labels=None, **_):
        logits, loss = run(input_ids, attention_mask, labels)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
    return forward


def chunked_cross_entropy(logits, labels, chunk: int = 128, ignore_index: int = -100):
    """transformers' ForCausalLMLoss (shift, mean over kept labels) without the full-size log-softmax and its
    gradient: the softmax is recomputed per chunk of rows in backward, written into one gradient buffer."""
    from torch.nn import functional as F

    target = F.pad(labels, (0, 1), value=ignore_index)[..., 1:].reshape(-1)
    return _ChunkedCE.apply(logits.reshape(-1, logits.shape[-1]), target, chunk, ignore_index)


def _chunked_ce_class():
    import torch
    from torch.nn import functional as F

    class ChunkedCE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, target, chunk, ignore_index):
            total = logits.new_zeros((), dtype=torch.float32)
            for i in range(0, logits.shape[0], chunk):
                total += F.cross_entropy(logits[i:i + chunk].float(), target[i:i + chunk], ignore_index=ignore_index,
                                         reduction="sum")
            count = (target != ignore_index).sum().clamp(min=1)
            ctx.save_for_backward(logits, target, count)
            ctx.chunk, ctx.ignore_index = chunk, ignore_index
            return total / count

        @staticmethod
        def backward(ctx, grad_out):
            logits, target, count = ctx.saved_tensors
            grad = torch.empty_like(logits)
            scale = grad_out / count
            for i in range(0, logits.shape[0], ctx.chunk):
                t = target[i:i + ctx.chunk]
                p = torch.softmax(logits[i:i + ctx.chunk].float(), dim=-1)
                keep = t != ctx.ignore_index
                rows = torch.arange(t.shape[0], device=t.device)[keep]
                p[rows, t[keep]] -= 1
                p[~keep] = 0
                grad[i:i + ctx.chunk] = p * scale
            return grad, None, None, None

    return ChunkedCE


class _Lazy:
    def __init__(self, make):
        self.make, self.cls = make, None

    def apply(self, *args):
        self.cls = self.cls or self.make()
        return self.cls.apply(*args)


_ChunkedCE = _Lazy(_chunked_ce_class)


def vocab_size(name: str, quick: bool) -> int:
    import transformers

    cls_name, full, tiny, _ = h.MODELS[name]
    return getattr(transformers, cls_name)(**(tiny if quick else full)).vocab_size


# ---- interleaved timing ---------------------------------------------------------------------
def interleaved(variants: list[str], args: argparse.Namespace) -> dict[str, dict]:
    import torch

    batch = h.make_batch(vocab_size(args.model, args.quick), args.batch, args.seq)
    runs = {}
    for v in variants:
        h.progress(f"[{v}] building")
        model = build_variant(v, args.model, args.quick, batch)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=h.LR)
        runs[v] = {"model": model, "opt": opt, "wall": [], "cpu": [], "losses": []}
    order = list(runs)
    shuffle = random.Random(h.SEED)
    for i in range(args.warmup + args.steps):
        shuffle.shuffle(order)  # no variant always runs right after the same one
        for v in order:
            r = runs[v]
            torch.manual_seed(h.SEED + 2 + i)
            t0, c0 = time.perf_counter(), time.process_time()
            loss = r["model"](**batch).loss
            loss.backward()
            r["opt"].step()
            r["opt"].zero_grad()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            r["losses"].append(loss.item())
            if i == 0:
                r["first_s"] = dt
            if i >= args.warmup:
                r["wall"].append(dt)
                r["cpu"].append(dc)
            h.progress(f"[{v}] step {i + 1}/{args.warmup + args.steps}: {dt:.2f} s")
    return {v: {"step_s": h.median(r["wall"]), "step_cpu_s": h.median(r["cpu"]), "first_s": r["first_s"],
                "loss_last": r["losses"][-1], "wall": r["wall"], "cpu": r["cpu"]} for v, r in runs.items()}


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a_i / b_i: each round's two steps ran back to back."""
    return h.median([x / y for x, y in zip(a, b)])


def print_time_table(results: dict[str, dict], args: argparse.Namespace) -> None:
    ref = results.get("peft")
    print(f"{'variant':<22} {'step s':>8} {'CPU s':>8} {'vs peft (wall / CPU)':>21} {'first step s':>13} {'last loss':>10}")
    for v, r in results.items():
        ratio = (f"{paired_ratio(r['wall'], ref['wall']):.3f}x / {paired_ratio(r['cpu'], ref['cpu']):.3f}x"
                 if ref else "-")
        print(f"{v:<22} {r['step_s']:>8.2f} {r['step_cpu_s']:>8.2f} {ratio:>21} {r['first_s']:>13.1f} {r['loss_last']:>10.4f}")


# ---- memory: one subprocess per variant ------------------------------------------------------
def memory_worker(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    batch = h.make_batch(vocab_size(args.model, args.quick), args.batch, args.seq)
    __import__(args.worker.split("#")[0].partition("+")[0])
    model = build_variant(args.worker, args.model, args.quick, batch)
    rss = h.rss_now_mb()
    h.reset_peak()
    times, _, losses = h.train_steps(model, batch, args.warmup, args.steps, f"[{args.worker}]")
    peak = h.peak_rss_mb()
    h.emit({"variant": args.worker, "peak_train_mb": peak, "rss_before_train_mb": rss,
            "step_live_mb": h.step_live_mb(model, batch), "step_s": h.median(times), "loss_last": losses[-1]})
    return 0


def print_memory_table(results: dict[str, dict]) -> None:
    ref = results.get("peft")
    print(f"{'variant':<22} {'RSS before train MB':>20} {'peak train MB':>14} {'vs peft':>8} {'step live MB':>13} {'vs peft':>8}")
    for v, r in results.items():
        ratio = f"{r['peak_train_mb'] / ref['peak_train_mb']:.3f}x" if ref else "-"
        live = f"{r['step_live_mb'] / ref['step_live_mb']:.3f}x" if ref else "-"
        print(f"{v:<22} {r['rss_before_train_mb']:>20.0f} {r['peak_train_mb']:>14.0f} {ratio:>8} {r['step_live_mb']:>13.0f} {live:>8}")


def main() -> int:
    ap = argparse.ArgumentParser(description="Prototype levers for surgeon's training step (see the module docstring).")
    ap.add_argument("--model", default="llama", choices=sorted(h.MODELS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=h.threads())
    ap.add_argument("--memory", action="store_true", help="peak RSS per variant, each in its own subprocess")
    ap.add_argument("--quick", action="store_true", help="tiny configs")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    if args.worker:
        return memory_worker(args)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    print(h.machine_line())
    print(f"model {args.model}, batch {args.batch} x seq {args.seq}, median of {args.steps} steps after {args.warmup} warm-up")
    if args.memory:
        common = ["--model", args.model, "--warmup", str(args.warmup), "--steps", str(args.steps), "--batch",
                  str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
        print_memory_table({v: h.run_worker(__file__, ["--worker", v, *common]) for v in variants})
    else:
        print_time_table(interleaved(variants, args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
