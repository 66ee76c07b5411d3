"""A TopK SAE whose latents are split over the ranks of a torch.distributed group (``ssae train --shard latents``
under torchrun), for dictionaries larger than one device.

Rank r holds latents ``shard_range(M, r, R)`` (M // R each, the first M % R ranks one more): their rows of W_enc,
b_enc and W_dec, their dead counts and their Adam state. b_dec, input_scale and every batch are the same on
every rank. Encode and decode are ``distributed.sharded_topk_encode`` and ``sharded_sparse_decode``: the code,
the reconstruction and the loss are the single-process ones, computed alike on every rank, and each rank's
backward pass yields the gradient rows of its own latents and the whole gradient of b_dec. So no gradient
crosses the network and each rank's optimizer steps its own rows; only the gradient norm (for clipping) is
summed. AuxK selects among the dead latents of all ranks the same way.

Memory per rank grows with M / R, except where the whole dictionary is gathered on rank 0's host: checkpoints
(written once, in the single-process format, so that a run resumes with any world size, one process
included) and the final SAE that ``ssae train`` saves and evaluates.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .distributed import shard_offsets, sharded_sparse_decode, sharded_topk_encode
from .ops import tilted_mse
from .sae import Loss, SAEConfig, TopKSAE, aux_loss, read_sae

# the parameters and buffers whose first dimension is the latents (each rank holds its rows)
PER_LATENT = ("W_enc", "b_enc", "W_dec", "tokens_since_fired")


def shard_range(num_latents: int, rank: int, world: int) -> range:
    """The latents rank ``rank`` of ``world`` holds: M // R of them, one more on the first M % R ranks."""
    size, extra = divmod(num_latents, world)
    start = rank * size + min(rank, extra)
    return range(start, start + size + (rank < extra))


class ShardedTopKSAE(TopKSAE):
    """A TopK SAE holding this rank's latents. ``encode``, ``decode``, ``loss`` and the gathering methods are
    collective: every rank of the group calls them, with the same inputs."""

    TOUCHED_ROWS = False  # trained with torch.optim.Adam on each rank's rows
    DATA_PARALLEL = False

    def __init__(self, cfg: SAEConfig, *, group=None, generator: torch.Generator | None = None):
        if cfg.arch != "topk":
            raise ValueError(f"latent sharding trains TopK SAEs only, not arch {cfg.arch!r}")
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        if world > cfg.num_latents:
            raise ValueError(f"{world} ranks cannot share {cfg.num_latents} latents (each needs at least one)")
        # the same random rows as the single-process SAE from this generator
        super().__init__(cfg, generator=generator, latents=shard_range(cfg.num_latents, rank, world))
        self.group, self.rank, self.world = group, rank, world

    def encode(self, x: torch.Tensor):
        W_enc, b_enc, _, b_dec = self._weights()
        return sharded_topk_encode(self._scaled(x), W_enc, b_enc, self.cfg.k, b_dec=b_dec, group=self.group)

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        _, _, W_dec, b_dec = self._weights()
        return sharded_sparse_decode(values, indices, W_dec, b_dec, group=self.group).float() / self.input_scale

    def loss(self, x: torch.Tensor, *, t: float = 0.0, sample_weights: torch.Tensor | None = None,
             touched_rows: bool = False) -> Loss:
        """``SAE.loss`` (the same value on every rank; gradients of this rank's rows and of b_dec)."""
        if touched_rows:
            raise NotImplementedError("a latent-sharded SAE trains with torch.optim.Adam on each rank's rows "
                                      "(optimizer 'adam'), not the touched-rows loss")
        W_enc, b_enc, W_dec, b_dec = self._weights()
        xs = self._scaled(x)
        values, indices = sharded_topk_encode(xs, W_enc, b_enc, self.cfg.k, b_dec=b_dec, group=self.group)
        x_hat = sharded_sparse_decode(values, indices, W_dec, b_dec, group=self.group)
        if sample_weights is None:
            recon = tilted_mse(x_hat, xs, t)
        else:
            recon = (sample_weights * torch.ops.ssae.row_sq_error(x_hat, xs)).mean()
        aux = torch.zeros((), device=xs.device)
        dead = self.dead_mask().nonzero().squeeze(1)
        _, all_dead = shard_offsets(dead.numel(), self.group)
        if all_dead:  # AuxK over the dead latents of every rank (some ranks may have none)
            aux_values, aux_indices = sharded_topk_encode(xs, W_enc[dead], b_enc[dead], min(self.cfg.k_aux, all_dead),
                                                          b_dec=b_dec, group=self.group)
            aux_hat = sharded_sparse_decode(aux_values, aux_indices, W_dec[dead], group=self.group)
            aux = aux_loss(xs.float() - x_hat.detach().float(), aux_hat.float())
        return Loss(recon + self.cfg.aux_coef * aux, recon, aux, values, indices)

    def dead_fraction(self) -> float:
        """The fraction of all latents that are dead."""
        dead = self.dead_mask().sum().reshape(1)
        dist.all_reduce(dead, group=self.group)
        return int(dead) / self.cfg.num_latents

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> None:
        """``torch.nn.utils.clip_grad_norm_`` of the whole dictionary's gradients: the ranks' squared norms of
        their rows are summed, b_dec's (the same on every rank) is counted once."""
        rows = [p.grad for p in (self.W_enc, self.b_enc, self.W_dec) if p.grad is not None]
        squares = sum((g.double().square().sum() for g in rows), torch.zeros((), dtype=torch.float64,
                                                                             device=self.b_dec.device))
        dist.all_reduce(squares, group=self.group)
        if self.b_dec.grad is not None:
            squares += self.b_dec.grad.double().square().sum()
        scale = (max_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)
        for g in [*rows, self.b_dec.grad]:
            if g is not None:
                g.mul_(scale.to(g.dtype))

    # ---- the whole dictionary on rank 0, and back -----------------------------------------

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor | None:
        """The [M, ...] tensor whose rows the ranks hold, on rank 0's host (one rank's rows in flight at a
        time); None on the other ranks."""
        sizes = [len(shard_range(self.cfg.num_latents, r, self.world)) for r in range(self.world)]
        if self.rank:
            dist.send(t.detach().contiguous(), group=self.group, group_dst=0)
            return None
        parts = [t.detach().cpu()]
        for r in range(1, self.world):
            incoming = t.new_empty((sizes[r], *t.shape[1:]))
            dist.recv(incoming, group=self.group, group_src=r)
            parts.append(incoming.cpu())
        return torch.cat(parts)

    def gathered(self) -> TopKSAE | None:
        """The whole SAE (a plain TopKSAE on the CPU) on rank 0; None on the other ranks."""
        state = {name: self.gather_rows(t) if name in PER_LATENT else t.detach().cpu()
                 for name, t in self.state_dict().items()}
        if self.rank:
            return None
        with torch.device("meta"):
            sae = TopKSAE(self.cfg)
        sae.load_state_dict(state, assign=True)
        return sae

    def gather_optimizer_state(self, state: dict[str, dict[str, torch.Tensor]]) -> dict | None:
        """Adam's state of the whole dictionary (parameter name -> its state) on rank 0; None on the others."""
        whole = {name: {key: self.gather_rows(value) if name in PER_LATENT and value.dim() else value.cpu()
                        for key, value in entry.items()} for name, entry in state.items()}
        return None if self.rank else whole

    def read_rows(self, directory: str) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
        """This rank's part of a (single-process) SAE directory, checked as ``SAE.load`` checks it."""
        return read_sae(directory, self.latents)
