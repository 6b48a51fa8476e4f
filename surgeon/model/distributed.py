"""``SurgeonModel`` under ``torch.distributed``: what data-parallel wrappers must leave alone.

``DistributedDataParallel`` broadcasts every parameter and buffer from rank 0 when it wraps a model, and
reduces every gradient. For a frozen base that is all cost and no use: each rank loads the base itself
(for a 7B base, 14 GB per rank at start). DDP skips what a module names in
``_ddp_params_and_buffers_to_ignore``; a surgeon model names its frozen parameters and its buffers there,
so only the trainable adapter tensors are broadcast (rank 0's initialisation wins) and all-reduced.
"""

from __future__ import annotations


class DistributedHooks:
    """Mixed into ``SurgeonModel``."""

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:  # read by DDP when it wraps the model
        frozen = [name for name, p in self.named_parameters() if not p.requires_grad]
        return frozen + [name for name, _ in self.named_buffers()]
