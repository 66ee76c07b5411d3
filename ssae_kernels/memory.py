"""How much memory training a TopK SAE needs, component by component, and the largest sizes that fit.

The model follows what a training step holds at its peak (the optimizer step): float32 master weights,
their float32 gradients, Adam's two moments (float32, or bfloat16 with sparse-adam), the batch's activations, and, with bfloat16 compute,
the bfloat16 copy of the weights that the kernels read. Nothing in it grows with N × M: the fused encode
never stores the pre-activations. ``benchmarks/bench_memory.py`` compares it with the measured peak on
this machine; ``tests/test_memory.py`` holds it to 10%.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

FLOAT32 = 4
INDEX = 8  # int64 latent indices
OPTIMIZER_STATES = {"adam": 2, "sparse-adam": 2, "sgd": 0}  # moments of each parameter's size
STATE_BYTES = {"float32": 4, "bfloat16": 2}  # bytes of a moment's element
# Batch tensors of N x d float32 alive at the peak: the sampled batch, its scaled copy, the decode and the
# residual of the AuxK loss (measured: 3.4 of them on this machine; 3.5 planned).
BATCH_COPIES = 3.5
# Tensors of N x k (values, indices and the backward's transposed copies; measured about 2 x 12 bytes).
SPARSE_COPIES = 2
FIXED_SCRATCH = 32 << 20  # per-thread kernel tiles, the allocator's arenas, small tensors
# What the process holds besides the tensors: torch and ssae_kernels with the code and thread pools their
# first step loads (measured here: 386 MiB), or a CUDA context with cuBLAS and the Triton runtime
# (assumed: about 600 MiB on an H100/H200; not measured).
RUNTIME = {"cpu": 390 << 20, "cuda": 600 << 20}


@dataclass
class MemoryPlan:
    latents: int
    d_in: int
    batch: int
    k: int
    components: dict[str, int] = field(default_factory=dict)  # bytes, in the order of the table

    @property
    def total(self) -> int:
        return sum(self.components.values())

    def table(self) -> str:
        rows = ["| component | GB |", "|---|---|"]
        rows += [f"| {name} | {value / 1e9:.3f} |" for name, value in self.components.items()]
        rows.append(f"| **total** | **{self.total / 1e9:.3f}** |")
        return "\n".join(rows)


def plan(latents: int, d_in: int, batch: int, k: int, *, compute_dtype: str = "float32", optimizer: str = "adam",
         optimizer_state: str = "float32", device: str = "cpu", dataset_tokens: int = 0, dead_fraction: float = 0.0,
         runtime_bytes: int | None = None) -> MemoryPlan:
    """The memory of training an SAE of ``latents`` x ``d_in`` on batches of ``batch`` tokens, by component.
    ``optimizer_state`` is the moments' dtype ('bfloat16' with sparse-adam only); ``dataset_tokens``
    activations held in memory count as the training data; ``dead_fraction`` of the latents in the AuxK
    loss add copies of their encoder and decoder rows."""
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_STATES)}, got {optimizer!r}")
    if optimizer_state not in STATE_BYTES:
        raise ValueError(f"optimizer_state must be one of {sorted(STATE_BYTES)}, got {optimizer_state!r}")
    if optimizer_state != "float32" and optimizer != "sparse-adam":
        raise ValueError(f"optimizer_state {optimizer_state!r} needs optimizer 'sparse-adam', got {optimizer!r}")
    if compute_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"compute_dtype must be 'float32' or 'bfloat16', got {compute_dtype!r}")
    device_type = device.split(":")[0]
    if device_type not in RUNTIME:
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    M, d, N = latents, d_in, batch
    params = (2 * M * d + M + d) * FLOAT32
    out = MemoryPlan(M, d, N, k)
    c = out.components
    c["runtime (torch, ssae_kernels)" if device_type == "cpu" else "runtime (CUDA context)"] = (
        RUNTIME[device_type] if runtime_bytes is None else runtime_bytes)
    c["weights (float32 master)"] = params + M * INDEX  # + the per-latent firing counters
    if compute_dtype == "bfloat16":
        c["weights (bfloat16 compute copy)"] = M * d * 2  # measured: one of the two matrices' copies at the peak
    if optimizer == "sparse-adam":
        # gradients only for the rows a batch touches (at most N k selected plus the dead latents AuxK may
        # pick), and the gathered copies of those rows that the loss reads; a step index per latent
        touched = min(M, N * k + math.ceil(dead_fraction * M))
        c["gradients (float32, touched rows)"] = 2 * touched * (2 * d + 1) * FLOAT32 + d * FLOAT32
        moments = "" if optimizer_state == "float32" else f", {optimizer_state} moments"
        c[f"optimizer states ({optimizer}{moments})"] = (
            OPTIMIZER_STATES[optimizer] * params // FLOAT32 * STATE_BYTES[optimizer_state] + M * INDEX)
    else:
        c["gradients (float32)"] = params
        c[f"optimizer states ({optimizer})"] = OPTIMIZER_STATES[optimizer] * params
    c["batch activations"] = int(BATCH_COPIES * N * d * FLOAT32 + SPARSE_COPIES * N * k * (FLOAT32 + INDEX))
    if dead_fraction > 0:
        c["AuxK copies of dead latents"] = int(2 * dead_fraction * M * d * FLOAT32)
    scratch = FIXED_SCRATCH
    if device_type == "cuda":  # the Triton encode's candidate buffers: N x splits x capacity int64 keys
        scratch += _triton_encode_scratch(N, M, k, compute_dtype)
    c["kernel scratch and allocator"] = scratch
    if dataset_tokens:
        c["training activations (in memory)"] = dataset_tokens * d * FLOAT32
    return out


def _triton_encode_scratch(N: int, M: int, k: int, compute_dtype: str, multiprocessors: int = 132) -> int:
    """Bytes of the Triton encode's candidate buffer, as it launches on an sm_90 GPU (132 SMs: H100/H200)."""
    import torch

    from .triton.topk_encode import encode_config, encode_plan

    dtype, device = getattr(torch, compute_dtype), torch.device("cuda")
    launch = encode_plan(N, M, k, dtype, device, config=encode_config(dtype, device, arch=90),
                         multiprocessors=multiprocessors)
    return math.prod(launch.scratch_shape) * INDEX


def largest(budget_bytes: int, vary: str, **sizes) -> int:
    """The largest ``vary`` ('latents' or 'batch') whose plan fits ``budget_bytes``, the others as given
    (a multiple of 256 latents or 64 tokens); 0 when even the smallest does not fit."""
    step = {"latents": 256, "batch": 64}[vary]

    def fits(n):
        return plan(**{**sizes, vary: n * step}).total <= budget_bytes

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * step


_SIZE = re.compile(r"^\s*([0-9.]+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """'24GB', '80 GiB', '512MB' or a plain number of bytes."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"not a memory size: {text!r} (e.g. 24GB, 80GiB, 512MB)")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(number * base**power)


def available_bytes(device: str = "cpu") -> int | None:
    """Memory free for a new run on ``device`` now (MemAvailable, or the CUDA device's free memory)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0] if torch.cuda.is_available() else None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
