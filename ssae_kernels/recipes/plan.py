"""``ssae plan``: the memory a training run needs, by component, and the largest dictionary and batch that fit."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from .. import memory
from .common import HelpFormatter, UsageError, check_positive, config_from_args


@dataclass
class PlanConfig:
    latents: int
    d: int
    batch: int = 4096
    k: int = 32
    dtype: str = "float32"
    optimizer: str = "adam"
    optimizer_state: str = "float32"
    device: str = "cpu"
    device_memory: str | None = None  # e.g. "24GB"; None: what this machine has free now
    tokens: int = 0  # training activations held in memory

    def sizes(self) -> dict:
        return dict(latents=self.latents, d_in=self.d, batch=self.batch, k=self.k, compute_dtype=self.dtype,
                    optimizer=self.optimizer, optimizer_state=self.optimizer_state, device=self.device, dataset_tokens=self.tokens)


def run(cfg: PlanConfig) -> dict:
    """The plan, the budget, and the largest latents and batch that fit it."""
    check_positive(latents=cfg.latents, d=cfg.d, batch=cfg.batch, k=cfg.k)
    if cfg.tokens < 0:
        raise UsageError(f"--tokens must be >= 0, got {cfg.tokens}")
    if cfg.device_memory is not None:
        try:
            budget = memory.parse_bytes(cfg.device_memory)
        except ValueError as error:
            raise UsageError(f"--device-memory: {error}") from None
    else:
        budget = memory.available_bytes(cfg.device)
        if budget is None:
            raise UsageError(f"--device-memory is needed: the free memory of {cfg.device} cannot be read here")
    sizes = cfg.sizes()
    try:
        planned = memory.plan(**sizes)
    except ValueError as error:
        raise UsageError(str(error)) from None
    return {"plan": planned, "budget": budget, "fits": planned.total <= budget,
            "largest_latents": memory.largest(budget, "latents", **sizes),
            "largest_batch": memory.largest(budget, "batch", **sizes)}


def add_subcommands(sub) -> None:
    p = sub.add_parser("plan", help="memory a training run needs, and the largest dictionary and batch that fit",
                       description="Memory of training a TopK SAE (Adam, float32 master weights) by component, "
                                   "from ssae_kernels.memory; checked against measured peaks by "
                                   "benchmarks/bench_memory.py.", formatter_class=HelpFormatter)
    p.add_argument("--latents", type=int, required=True, help="dictionary size M")
    p.add_argument("--d", type=int, required=True, help="input width d_in")
    p.add_argument("--batch", type=int, default=4096, help="tokens per step")
    p.add_argument("--k", type=int, default=32, help="active latents per token")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype of the kernels")
    p.add_argument("--optimizer", choices=sorted(memory.OPTIMIZER_STATES), default="adam",
                   help="optimizer whose states to plan for")
    p.add_argument("--optimizer-state", choices=sorted(memory.STATE_BYTES), default="float32",
                   help="dtype of the optimizer's moments (bfloat16: sparse-adam only)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device to plan for")
    p.add_argument("--device-memory", default=None,
                   help="memory to plan for, e.g. 24GB or 80GiB (None: what this machine has free now)")
    p.add_argument("--tokens", type=int, default=0, help="training activations held in memory")
    p.set_defaults(handler=_handler)


def _handler(args: argparse.Namespace) -> None:
    result = run(config_from_args(PlanConfig, args))
    planned, budget = result["plan"], result["budget"]
    print(planned.table())
    verdict = "fits" if result["fits"] else "does NOT fit"
    batch = f"{result['largest_batch']:,} tokens" if result["largest_batch"] else "none (the dictionary alone is too large)"
    print(f"\n{verdict} in {budget / 1e9:.1f} GB. Largest dictionary that fits at this width and batch: "
          f"{result['largest_latents']:,} latents; largest batch at these latents: {batch}")
