"""``surgeon train`` under a launcher (``torchrun``, ``accelerate launch``): one process per rank, the global batch
split between them, DDP over the adapter, one progress bar and one writer (rank 0).

Every rank draws the same rows from the same seeded generator and takes its own contiguous share, so N processes
x B/N rows step exactly as one process x B rows (up to float rounding; tested at 2 processes). All communication
is torch.distributed's (gloo on CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from surgeon.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, n: int, what: str) -> slice:
        """This rank's contiguous share of ``n`` rows (``n`` must divide evenly: every rank steps on as many)."""
        if n % self.world:
            raise ConfigError(f"{what}={n} does not split evenly over {self.world} processes; give a multiple of "
                             f"{self.world}")
        k = n // self.world
        return slice(self.rank * k, (self.rank + 1) * k)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar over ranks (itself when alone)."""
        if self.world == 1:
            return value
        total = value.detach().clone()
        dist.all_reduce(total)  # SUM: gloo has no AVG
        return total / self.world

    def total(self, *values: float) -> tuple[float, ...]:
        """Each value summed over ranks."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return tuple(t.tolist())

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP over ``model`` when there are several ranks: only its trainable tensors are broadcast and reduced
        (``SurgeonModel._ddp_params_and_buffers_to_ignore``)."""
        return DistributedDataParallel(model) if self.world > 1 else model


def launched() -> bool:
    """Whether a launcher started this process as one of several (torchrun and accelerate set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def process_group() -> Iterator[Ranks]:
    """The ranks of this job: a gloo process group for the block when launched as several processes, else one rank."""
    if not launched():
        yield Ranks()
        return
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo")  # surgeon train runs on CPU
    yield Ranks(dist.get_rank(), dist.get_world_size())
    # reached on success only (after an error the process exits and the launcher ends the other ranks, which may
    # wait in a collective that will never complete); the barrier also keeps every rank until rank 0 has written
    if owned:
        settle_and_destroy()


def settle_and_destroy() -> None:
    """``destroy_process_group`` after a barrier; call it at the end of every rank's work. A gloo group still alive
    when the interpreter exits can abort the process ("terminate called without an active exception"), and
    without the barrier gloo's destructor (which holds the GIL) can wait forever for a worker thread that still
    frees the last all-reduce's tensors (which needs the GIL). Both seen with torch 2.13 under load."""
    dist.barrier()
    dist.destroy_process_group()


def settle_and_exit() -> None:
    """End a launched script that trained with ``transformers.Trainer``: a barrier, then the process ends at once
    (``os._exit(0)`` after flushing), skipping teardown. Accelerate's state keeps the gloo group referenced after
    ``destroy_process_group``; under load its teardown hung in a rank whose peer had already exited (twice in
    four full test runs, in the Trainer paths only). Call it last: nothing after it runs."""
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
