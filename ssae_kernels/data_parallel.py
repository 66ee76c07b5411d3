"""Data-parallel training over the ranks of a torch.distributed group (gloo on CPU, NCCL on GPU).

Every rank draws the same global batch (``trainer.BatchSampler``: the same seed and step on every rank) and
trains on its equal share of the rows; the gradients are averaged over the ranks with one all-reduce of
all of them (flattened), so each step is the single-process step on the whole batch, up to the order of
floating-point sums. The latents that fired anywhere in the batch restart their dead counts on every rank.
Rank 0 writes checkpoints and metrics; a checkpoint holds no trace of the world size, so a run resumes
with any number of ranks (one process included).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from .distributed import control_device

# A rank that died leaves the others waiting in a collective: they fail after this long instead of hanging.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


def unsupported(sae_class, optimizer: str, tilted: bool) -> str | None:
    """What of a training setup data-parallel training does not support yet, or None: what a batch changes
    beyond the gradients and the dead counts would differ between the ranks (``SAE.DATA_PARALLEL``)."""
    if optimizer != "adam":
        return f"optimizer {optimizer!r} (only 'adam')"
    if tilted:
        return "TERM (only ERM)"
    if not sae_class.DATA_PARALLEL:
        return f"a {sae_class.__name__}"
    return None


class DataParallel:
    """This process's part in data-parallel training (the group must be initialised)."""

    def __init__(self, group=None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("data-parallel training needs torch.distributed initialised (run under torchrun)")
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.device = control_device(group)

    @property
    def writes(self) -> bool:
        """Whether this rank writes the run's files."""
        return self.rank == 0

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world:
            raise ValueError(f"batch_size {batch_size} must be a multiple of the world size {self.world} "
                             "(every rank trains on an equal share of each batch)")

    def rows(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's share of a global batch."""
        share = batch.shape[0] // self.world
        return batch[self.rank * share:(self.rank + 1) * share]

    def average_gradients(self, params) -> None:
        """Every gradient becomes its mean over the ranks (one all-reduce of them all, flattened)."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat, group=self.group)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def union(self, mask: torch.Tensor) -> torch.Tensor:
        """The elementwise OR of a bool mask over the ranks."""
        counts = mask.to(torch.int32)
        dist.all_reduce(counts, group=self.group)
        return counts > 0

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank."""
        t = torch.tensor([int(flag)], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, group=self.group)
        return bool(t.item())

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank."""
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0, group=self.group)

    def barrier(self) -> None:
        dist.barrier(group=self.group)


def world_size() -> int:
    """The number of processes torchrun started (WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def from_environment(device: str) -> tuple[DataParallel | None, str]:
    """(DataParallel, this rank's device) under torchrun with more than one process, after initialising the
    process group (gloo for CPU devices, NCCL for CUDA ones, each rank on GPU LOCAL_RANK); (None, device)
    otherwise."""
    if world_size() <= 1:
        return None, device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=DEFAULT_TIMEOUT)
    return DataParallel(), device
