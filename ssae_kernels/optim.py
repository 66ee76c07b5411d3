"""Adam that reads and writes only the rows a step has gradients for, with dense Adam's result.

In a TopK SAE step only the latents the batch selected (and AuxK's) get gradient rows: at
M = 1,048,576 and N = 4096, k = 32 about a tenth of them. Dense Adam still reads and writes
every row and both of its moments each step, because a row without gradient keeps moving:
its moments decay, and m / sqrt(v) still steps it. :class:`SparseAdam` defers those moves.
A row is caught up on the steps it skipped when it is next touched (or at :meth:`flush`), in
closed form: after s skipped steps m and v have decayed by beta1^s and beta2^s, and the
skipped updates sum to

    m / sqrt(v) * sum_{j=1..s} lr_j * c_j * r^j,   r = beta1 / sqrt(beta2),  c_j = sqrt(1 - beta2^t_j) / (1 - beta1^t_j)

(t_j the step number, lr_j its learning rate): a scalar per row, from a table of the recent
steps' lr_j c_j (``SkippedSteps``). So the state of a row when it is read for its next update
is dense Adam's, and :meth:`flush` brings every row to dense Adam's state (checkpoints are
torch.optim.Adam's; either optimizer resumes the other's).

Two approximations, both small and bounded:
- the skipped steps use the eps of the first skipped step (dense Adam's eps term shrinks by
  sqrt(beta2) a step relative to sqrt(v)); this matters only where sqrt(v) is near eps;
- sums are cut after ``horizon`` steps, where r^horizon < 2^-32.

What differs from dense Adam is when rows move, not where they end up: between touches the
forward pass sees a row without its pending momentum tail. This is the lazy-update choice;
the alternative, lazy Adam with per-row step counts (TensorFlow's LazyAdam), drops the
tail altogether and changes the moments' meaning, so checkpoints would not be Adam's.

``state_dtype=torch.bfloat16`` holds the moments in bfloat16 (half their memory, a third of the
training state with float32 weights), computed in float32 and stored with stochastic rounding
(``ops/sparse_adam.py``): equal to the float32 optimizer in expectation, not bit for bit.
"""

from __future__ import annotations

import math

import torch

from .ops import sparse_adam_


class SkippedSteps:
    """Per-row catch-up factors from the history of a_t = lr_t * sqrt(1 - beta2^t) / (1 - beta1^t)."""

    def __init__(self, beta1: float, beta2: float, eps: float, device: torch.device, *, first_step: int = 0):
        self.beta1, self.beta2, self.eps, self.device = beta1, beta2, eps, device
        self.r = beta1 / math.sqrt(beta2)
        self.horizon = max(1, math.ceil(-32 * math.log(2) / math.log(self.r))) if self.r > 0 else 1
        self.first_step = first_step  # every row is current through this step: no sum reaches back past it
        self.scaled_lr: list[float] = []  # a_t for t = first_step + 1, ...
        # tails[t0 - first_step] = sum_{j=1..horizon} a_{t0+j} r^j: the drift of a row idle since t0 for longer
        # than the horizon (later terms are below 2^-32 of it), written once all its terms are known
        self.tails = torch.zeros(1024, dtype=torch.float64, device=device)
        self.recent = torch.zeros(self.horizon + 1, dtype=torch.float64, device=device)  # _sums of the last step

    def record(self, step: int, lr: float) -> None:
        """The learning rate of update ``step`` (steps are recorded in order)."""
        assert step == self.first_step + len(self.scaled_lr) + 1, (step, self.first_step, len(self.scaled_lr))
        self.scaled_lr.append(lr * math.sqrt(1 - self.beta2**step) / (1 - self.beta1**step))
        self.recent = torch.tensor(self._sums(step), dtype=torch.float64, device=self.device)

    def _sums(self, upto: int) -> list[float]:
        """E[s] = sum_{j=1..s} a_{upto-s+j} r^j for s = 0..horizon: the drift of s skipped steps ending at upto."""
        sums = [0.0] * (self.horizon + 1)
        for s in range(1, self.horizon + 1):
            step = upto - s + 1
            a = self.scaled_lr[step - self.first_step - 1] if step > self.first_step else 0.0
            sums[s] = self.r * (a + sums[s - 1])
        slot = upto - self.horizon - self.first_step
        if slot >= 0:
            if slot >= self.tails.numel():
                self.tails = torch.cat([self.tails, torch.zeros_like(self.tails)])
            self.tails[slot] = sums[self.horizon]
        return sums

    def table(self, last: torch.Tensor, upto: int, dtype: torch.dtype) -> torch.Tensor:
        """[R, 4] (drift, decay1, decay2, eps_skip) for rows current through steps ``last`` [R], skipping
        steps last+1 .. upto, the last step recorded."""
        assert upto == self.first_step + len(self.scaled_lr), (upto, self.first_step, len(self.scaled_lr))
        skipped, recent = upto - last, self.recent
        tails = self.tails[(last - self.first_step).clamp(0, self.tails.numel() - 1)]
        drift = torch.where(skipped > self.horizon, tails, recent[skipped.clamp(max=self.horizon)])
        s = skipped.double()
        eps_skip = self.eps * torch.sqrt(1 - self.beta2 ** (last.double() + 1)) / math.sqrt(self.beta2)
        return torch.stack([drift, self.beta1**s, self.beta2**s, eps_skip], 1).to(dtype)


class SparseAdam:
    """Adam (torch.optim.Adam's update, no weight decay) on parameters whose rows get sparse gradients.

    ``params``: name -> parameter, each indexed by latent along dim 0 ([M, ...]); ``dense``:
    name -> parameters updated whole every step (e.g. the decoder bias). :meth:`step` takes the
    rows that have gradients and their gradient rows. See the module docstring for the semantics.
    """

    def __init__(self, params: dict[str, torch.Tensor], dense: dict[str, torch.Tensor], *, lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, state_dtype: torch.dtype | None = None):
        beta1, beta2 = betas
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if beta1 > 0 and beta1 >= math.sqrt(beta2):
            # then m / sqrt(v) grows on every skipped step and the skipped movement has no finite sum
            raise ValueError(f"SparseAdam needs beta1 < sqrt(beta2) (the skipped steps' movement must decay), "
                             f"got betas {betas}; use dense Adam for these betas")
        rows = {p.shape[0] for p in params.values()}
        if len(rows) != 1:
            raise ValueError(f"params must share their first dimension (latents), got sizes {sorted(rows)}")
        dtypes = {p.dtype for p in {**params, **dense}.values()}
        if state_dtype not in (None, *dtypes) and not (state_dtype == torch.bfloat16 and dtypes == {torch.float32}):
            raise ValueError(f"state_dtype must be the parameters' dtype or bfloat16 (with float32 parameters), "
                             f"got {state_dtype} for parameters of {sorted(map(str, dtypes))}")
        self.params, self.dense = params, dense
        self.lr, self.betas, self.eps = lr, betas, eps
        self.step_count = 0
        self.state = {name: (torch.zeros_like(p, dtype=state_dtype), torch.zeros_like(p, dtype=state_dtype))
                      for name, p in {**params, **dense}.items()}
        # each parameter's own stochastic-rounding bits (bfloat16 moments)
        self.seeds = {name: i for i, name in enumerate(self.state)}
        device = next(iter(params.values())).device
        self.last = torch.zeros(rows.pop(), dtype=torch.int64, device=device)  # each row is current through this step
        self.skipped = SkippedSteps(beta1, beta2, eps, device)

    @staticmethod
    def _rows_view(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], -1) if t.dim() != 2 else t

    @torch.no_grad()
    def step(self, rows: torch.Tensor, grads: dict[str, torch.Tensor], dense_grads: dict[str, torch.Tensor]) -> None:
        """One update: ``grads[name]`` [R, ...] are the gradient rows of ``params[name][rows]`` (rows distinct);
        every other row has zero gradient this step. ``dense_grads[name]`` is a dense parameter's gradient."""
        t = self.step_count + 1
        if rows.numel():
            self._update_rows(rows, grads, upto=t - 1, step=t)
            self.last[rows] = t
        kw = dict(lr=self.lr, beta1=self.betas[0], beta2=self.betas[1], eps=self.eps, step=t)
        for name, p in self.dense.items():  # one row, touched every step
            m, v = self.state[name]
            nothing = torch.tensor([[0.0, 1.0, 1.0, 1.0]], dtype=p.dtype, device=p.device)
            sparse_adam_(p.view(1, -1), m.view(1, -1), v.view(1, -1), torch.zeros(1, dtype=torch.int64,
                         device=p.device), dense_grads[name].reshape(1, -1), nothing, seed=self.seeds[name], **kw)
        self.skipped.record(t, self.lr)
        self.step_count = t

    def _update_rows(self, rows: torch.Tensor, grads: dict[str, torch.Tensor] | None, *, upto: int, step: int):
        """Catches ``rows`` up through step ``upto``, then (with ``grads``) applies update ``step`` to them."""
        catchup = self.skipped.table(self.last[rows], upto, next(iter(self.params.values())).dtype)
        for name, p in self.params.items():
            m, v = self.state[name]
            grad = None if grads is None else self._rows_view(grads[name])
            sparse_adam_(self._rows_view(p), self._rows_view(m), self._rows_view(v), rows, grad, catchup,
                         lr=self.lr, beta1=self.betas[0], beta2=self.betas[1], eps=self.eps, step=step,
                         seed=self.seeds[name])

    @torch.no_grad()
    def flush(self) -> torch.Tensor:
        """Catches every row up to the current step (dense Adam's state); returns the rows it moved."""
        stale = (self.last < self.step_count).nonzero().squeeze(1)
        if stale.numel():
            self._update_rows(stale, None, upto=self.step_count, step=max(1, self.step_count))
            self.last[stale] = self.step_count
        self.skipped = SkippedSteps(*self.betas, self.eps, self.last.device, first_step=self.step_count)
        return stale

    # ---- checkpoints: torch.optim.Adam's per-parameter state, after a flush -------------------------

    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """name -> {"exp_avg", "exp_avg_sq", "step"} as torch.optim.Adam holds them (call :meth:`flush` first;
        bfloat16 moments stay bfloat16)."""
        if bool((self.last < self.step_count).any()):
            raise RuntimeError("SparseAdam has rows with pending skipped steps: flush() before saving its state")
        step = torch.tensor(float(self.step_count))
        return {name: {"exp_avg": m, "exp_avg_sq": v, "step": step} for name, (m, v) in self.state.items()}

    def load_state_tensors(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """The inverse of :meth:`state_tensors` (also reads torch.optim.Adam's state of the same parameters;
        moments are converted to this optimizer's state dtype)."""
        steps = {int(entry["step"]) for entry in state.values()}
        if len(steps) != 1:
            raise ValueError(f"the optimizer state holds different step counts {sorted(steps)}")
        for name, (m, v) in self.state.items():
            m.copy_(state[name]["exp_avg"])
            v.copy_(state[name]["exp_avg_sq"])
        self.step_count = steps.pop()
        self.last.fill_(self.step_count)
        self.skipped = SkippedSteps(*self.betas, self.eps, self.last.device, first_step=self.step_count)
