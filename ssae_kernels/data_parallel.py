"""Data-parallel training over the ranks of a torch.distributed group (gloo on CPU, NCCL on GPU).

Every rank draws the same global batch (``trainer.BatchSampler``: the same seed and step on every rank) and
trains on its equal share of the rows; the gradients are averaged over the ranks (torch.optim.Adam: an
all-reduce of each; SparseAdam: an all-gather of the rows each rank touched, ``merge_touched``), so each step
is the single-process step on the whole batch, up to the order of floating-point sums. The latents that
fired anywhere in the batch restart their dead counts on every rank.
Rank 0 writes checkpoints and metrics; a checkpoint holds no trace of the world size, so a run resumes
with any number of ranks (one process included).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from .distributed import all_gather_parts, control_device

# A rank that died leaves the others waiting in a collective: they fail after this long instead of hanging.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


def unsupported(sae_class, optimizer: str, tilted: bool) -> str | None:
    """What of a training setup data-parallel training does not support yet, or None: what a batch changes
    beyond the gradients and the dead counts would differ between the ranks (``SAE.DATA_PARALLEL``). (Both
    optimizers are served: torch.optim.Adam by a dense all-reduce, SparseAdam by ``merge_touched``.)"""
    if tilted:
        return "TERM (only ERM)"
    if not sae_class.DATA_PARALLEL:
        return f"a {sae_class.__name__}"
    return None


class Ranks:
    """This process's place in an initialised torch.distributed group: its rank, the world size, and the small
    collectives that keep the ranks of a run in step."""

    def __init__(self, group=None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("training on several processes needs torch.distributed initialised (run under "
                               "torchrun)")
        self.group = dist.group.WORLD if group is None else group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.device = control_device(group)

    @property
    def writes(self) -> bool:
        """Whether this rank writes the run's files."""
        return self.rank == 0

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank."""
        t = torch.tensor([int(flag)], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, group=self.group)
        return bool(t.item())

    def barrier(self) -> None:
        dist.barrier(group=self.group)


class DataParallel(Ranks):
    """This process's part in data-parallel training."""

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world:
            raise ValueError(f"batch_size {batch_size} must be a multiple of the world size {self.world} "
                             "(every rank trains on an equal share of each batch)")

    def rows(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's share of a global batch."""
        share = batch.shape[0] // self.world
        return batch[self.rank * share:(self.rank + 1) * share]

    def average_gradients(self, params) -> None:
        """Every gradient becomes its mean over the ranks (an all-reduce of each, in place)."""
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, group=self.group)
                p.grad.div_(self.world)

    def merge_touched(self, rows: torch.Tensor, grads: dict[str, torch.Tensor]):
        """The touched-rows form of ``average_gradients`` (for SparseAdam): ``rows`` [R_r], the latents this rank
        touched, and ``grads`` (name -> [R_r, ...], their gradient rows) become the union of the ranks' rows
        (sorted) and the mean over the ranks of their gradients. All-gathers of the row ids and of each
        gradient's rows, padded to the largest rank's count: O(touched rows * d) sent, not O(M * d)."""
        counts = [int(c) for c in all_gather_parts(torch.tensor([rows.numel()], device=rows.device), self.group)]
        most = max(counts)
        all_ids = all_gather_parts(_padded(rows, most), self.group)
        union, slot = torch.unique(torch.cat([ids[:n] for ids, n in zip(all_ids, counts)]), return_inverse=True)
        slots = slot.split(counts)
        merged = {}
        for name, grad in grads.items():
            total = grad.new_zeros((union.numel(), *grad.shape[1:]))
            for part, n, where in zip(all_gather_parts(_padded(grad, most), self.group), counts, slots):
                total.index_add_(0, where, part[:n])
            merged[name] = total.div_(self.world)
        return union, merged

    def union(self, mask: torch.Tensor) -> torch.Tensor:
        """The elementwise OR of a bool mask over the ranks."""
        counts = mask.to(torch.int32)
        dist.all_reduce(counts, group=self.group)
        return counts > 0

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank."""
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0, group=self.group)



def world_size() -> int:
    """The number of processes torchrun started (WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def from_environment(device: str) -> tuple[Ranks | None, str]:
    """(Ranks, this rank's device) under torchrun with more than one process, after initialising the process
    group (gloo for CPU devices, NCCL for CUDA ones, each rank on GPU LOCAL_RANK); (None, device) otherwise."""
    if world_size() <= 1:
        return None, device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=DEFAULT_TIMEOUT)
    return Ranks(), device


def _padded(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t with zero rows appended up to ``rows`` (t itself when it has that many)."""
    if t.shape[0] == rows:
        return t
    out = t.new_zeros((rows, *t.shape[1:]))
    out[:t.shape[0]] = t
    return out
