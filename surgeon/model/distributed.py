"""``SurgeonModel`` under ``torch.distributed``: what data-parallel wrappers must leave alone, and FSDP2.

``DistributedDataParallel`` broadcasts every parameter and buffer from rank 0 when it wraps a model, and
reduces every gradient. For a frozen base that is all cost and no use: each rank loads the base itself
(for a 7B base, 14 GB per rank at start). DDP skips what a module names in
``_ddp_params_and_buffers_to_ignore``; a surgeon model names its frozen parameters and its buffers there,
so only the trainable adapter tensors are broadcast (rank 0's initialisation wins) and all-reduced.

FSDP2 (``fully_shard(model)``) keeps each rank's shard of every tensor and gathers them in its hook before
the model's forward (and again before backward), by swapping the modules' parameters. A captured graph holds
its own references to the base's tensors, so before each forward under FSDP the graphs are pointed at the
gathered ones (``GraphSet.rebind``). The model must be sharded as one unit: the graph never calls the base's
submodules, so a ``fully_shard`` on one of them (a decoder layer) would never gather its weights; that is
refused by name. ``save_pretrained`` gathers the adapter for the write (every rank must call it, as with PEFT
under FSDP; ``is_main_process`` picks the one that writes).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from surgeon.capturing import forget
from surgeon.errors import ConfigError


class DistributedHooks:
    """Mixed into ``SurgeonModel``."""

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:  # read by DDP when it wraps the model
        frozen = [name for name, p in self.named_parameters() if not p.requires_grad]
        return frozen + [name for name, _ in self.named_buffers()]


def release_replaced(model: nn.Module, args: tuple) -> None:
    """Forward pre-hook of every ``SurgeonModel`` (registered before ``fully_shard`` registers its own): under FSDP,
    the graphs let go of the tensors from before sharding, before FSDP gathers the new ones."""
    if isinstance(model, FSDPModule):
        _rebind(model)


def bind_gathered(model: nn.Module) -> None:
    """Under ``fully_shard(model)``: the graphs run on the tensors FSDP gathered for this forward."""
    if not isinstance(model, FSDPModule):
        return
    inner = next((name for name, m in model.named_modules() if name and isinstance(m, FSDPModule)), None)
    if inner is not None:
        raise ConfigError(f"fully_shard was applied to {inner!r} inside the surgeon model; a surgeon model runs one "
                          "captured graph that never calls that module's forward, so FSDP would never gather its "
                          "weights. Shard the model as one unit: fully_shard(model) alone (Accelerate: "
                          "fsdp_auto_wrap_policy NO_WRAP)")
    if model.compile_graphs:
        raise ConfigError("compile=True is not supported under fully_shard yet; build the model without compile")
    sharded = _rebind(model)
    if sharded is not None:
        raise ConfigError(f"{sharded!r} is still sharded: FSDP gathers the weights in the hook of the model's own "
                          "forward, so call the model itself (model(...)), not a method that bypasses it")


def _rebind(model: nn.Module) -> str | None:
    """Every graph at the tensors the base holds now; the name of one that is a shard (DTensor), if any."""
    base = model.base
    live = dict(itertools.chain(base.named_parameters(remove_duplicate=False), base.named_buffers(remove_duplicate=False)))
    model.graphs.rebind(live)
    forget(base)  # the capture cache's copies would keep the tensors from before fully_shard alive
    return next((name for name, t in live.items() if isinstance(t, DTensor)), None)


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Under ``fully_shard(model)``: the whole tensors in the modules for the block (a collective: every rank enters)."""
    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()
