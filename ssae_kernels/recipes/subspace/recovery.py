"""Recovery of a planted subspace: how close the recipe's span(U) comes to the subspace a behaviour really
lives in, as the SAE's features go from polysemantic to monosemantic.

The synthetic model (:func:`planted_recovery`):

- ``features`` true feature directions in R^d (more features than dimensions: superposition). The first
  ``behaviour_features`` of them lie in a planted subspace S of dimension ``rank``; the rest are random.
- Tokens are sparse non-negative mixtures of features. Target tokens activate behaviour features (and
  background ones), contrast tokens background features only.
- The SAE has one latent per feature, with polysemanticity ``eps``: latent j responds to its own feature
  and, with weight ``eps``, to a partner feature p(j), and its decoder direction is the same mixture,
  ``normalise((1 - eps) f_j + eps f_p(j))``. At ``eps = 0`` every latent is monosemantic.
- The recipe runs as on a real model: :func:`~.features.select_features` on the latents' mean activations
  over target and contrast tokens, then the decoder directions of the selected latents and their rank-``rank``
  principal subspace (:func:`~.adapters.build_subspace`).

The recovery error is ``||P_S - P_U||_2``, the sine of the largest principal angle between S and span(U).
Under monosemanticity the selected directions lie in S and the error is 0 (SAILS proves that it can be
made arbitrarily small under such assumptions); mixing in other features tilts U out of S.
"""

from __future__ import annotations

import math

import torch

from .adapters import build_subspace
from .features import select_features


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def planted_recovery(eps: float, *, d: int = 64, features: int = 512, rank: int = 4, behaviour_features: int = 8,
                     tokens: int = 4096, active: int = 6, seed: int = 0) -> dict:
    """The recipe on the synthetic model of this module's docstring at polysemanticity ``eps`` in [0, 1).

    Returns {'eps', 'error' (sine of the largest principal angle), 'angles_degrees' (the ``rank`` principal
    angles, smallest first), 'selected_behaviour' (fraction of selected latents that belong to behaviour
    features)}."""
    if not 0 <= eps < 1:
        raise ValueError(f"eps must be in [0, 1), got {eps}")
    if not 0 < rank <= behaviour_features < features or rank > d:
        raise ValueError(f"need 0 < rank <= behaviour_features < features and rank <= d, got rank={rank}, "
                         f"behaviour_features={behaviour_features}, features={features}, d={d}")
    g = torch.Generator().manual_seed(seed)
    S = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64))[0]  # the planted subspace
    inside = _unit_rows(torch.randn(behaviour_features, rank, generator=g, dtype=torch.float64) @ S.T)
    outside = _unit_rows(torch.randn(features - behaviour_features, d, generator=g, dtype=torch.float64))
    directions = torch.cat([inside, outside])  # [features, d]; the first behaviour_features span S

    def codes(n: int, behaviour: bool) -> torch.Tensor:
        c = torch.zeros(n, features, dtype=torch.float64)
        background = torch.randint(behaviour_features, features, (n, active), generator=g)
        c.scatter_(1, background, torch.rand(n, active, generator=g, dtype=torch.float64))
        if behaviour:
            own = torch.randint(0, behaviour_features, (n, 2), generator=g)
            c.scatter_(1, own, 1 + torch.rand(n, 2, generator=g, dtype=torch.float64))
        return c

    partner = torch.randperm(features, generator=g)  # latent j also responds to feature partner[j]
    mix = (1 - eps) * torch.eye(features, dtype=torch.float64) + eps * torch.eye(features, dtype=torch.float64)[partner]
    decoder = _unit_rows(mix @ directions)  # [latents, d]

    def latent_means(c: torch.Tensor) -> torch.Tensor:
        return (c @ mix.T).mean(0).float()  # latent j's activation: (1 - eps) c_j + eps c_partner[j]

    mean_target = {0: latent_means(codes(tokens, True))}
    mean_contrast = {0: latent_means(codes(tokens, False))}
    chosen = select_features(mean_target, mean_contrast, per_layer=behaviour_features, signs="target")[0].ids
    U, _, _ = build_subspace(decoder[chosen], variance=1.0)
    U = U.double()[:, :rank]  # the rank-`rank` principal subspace of the selected directions
    cosines = torch.linalg.svdvals(S.T @ U).clamp(max=1.0)
    error = float(torch.linalg.matrix_norm(S @ S.T - U @ U.T, ord=2))
    return {"eps": eps, "error": error,
            "angles_degrees": [math.degrees(math.acos(float(c))) for c in cosines],
            "selected_behaviour": sum(i < behaviour_features for i in chosen) / len(chosen)}


EPS_VALUES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4)  # polysemanticity of the plotted curve


def recovery_curve(eps_values=EPS_VALUES, seeds: int = 5, **kwargs) -> list[dict]:
    """:func:`planted_recovery` at each ``eps``, its error averaged (and its spread) over ``seeds`` seeds."""
    rows = []
    for eps in eps_values:
        runs = [planted_recovery(eps, seed=s, **kwargs) for s in range(seeds)]
        errors = torch.tensor([r["error"] for r in runs])
        rows.append({"eps": eps, "error_mean": float(errors.mean()), "error_min": float(errors.min()),
                     "error_max": float(errors.max()),
                     "largest_angle_degrees_mean": sum(r["angles_degrees"][-1] for r in runs) / seeds,
                     "selected_behaviour_mean": sum(r["selected_behaviour"] for r in runs) / seeds})
    return rows


def write_recovery(out: str, eps_values=EPS_VALUES, seeds: int = 5) -> list[dict]:
    """:func:`recovery_curve` written to ``out``.json and plotted to ``out``.png; returns its rows."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = recovery_curve(eps_values, seeds)
    with open(out + ".json", "w") as f:
        json.dump({"rows": rows, "model": "planted_recovery defaults (d=64, 512 features, planted rank 4, "
                   f"8 behaviour features), {seeds} seeds"}, f, indent=1)
    eps = [r["eps"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(eps, [r["error_mean"] for r in rows], "o-", color="#d9480f", label=f"mean of {seeds} seeds")
    ax.fill_between(eps, [r["error_min"] for r in rows], [r["error_max"] for r in rows], color="#d9480f", alpha=0.2,
                    label="min to max")
    ax.set_xlabel("polysemanticity eps of the SAE's latents")
    ax.set_ylabel("||P_S - P_U||  (sine of largest angle)")
    ax.set_title("Planted subspace recovered by the recipe", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out + ".png")
    plt.close(fig)
    return rows
