"""Steps 2 and 3: the subspace U from the selected features' decoder directions, and the ways of training
only inside it (a LoRA with output factor U, or projected gradients on the full weights), beside plain
LoRA of the same rank for comparison."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

from ...models import check_layer, decoder_layers
from ...ops import project_subspace, project_subspace_
from .features import FeatureSelection

# ---- the subspace ---------------------------------------------------------------------------------


@dataclass
class Subspace:
    layer: int
    U: torch.Tensor  # [d, r], orthonormal columns (float32)
    feature_ids: list[int]
    explained: float  # fraction of the directions' variance inside span(U)
    singular_values: list[float]

    @property
    def rank(self) -> int:
        return self.U.shape[1]


def build_subspace(directions: torch.Tensor, variance: float = 0.8, *, center: bool = False):
    """Orthonormal basis U [d, r] of the principal subspace of ``directions`` [F, d] (rows scaled to
    unit norm) that keeps at least ``variance`` of their variance; r is the smallest such rank.

    Returns (U float32, explained variance, singular values). PCA is uncentred by default: the
    mean of feature directions that share a behaviour is itself a direction to keep.
    """
    if not 0 < variance <= 1:
        raise ValueError(f"variance must be in (0, 1], got {variance}")
    if directions.dim() != 2 or directions.shape[0] < 1:
        raise ValueError(f"directions must be [F >= 1, d], got shape {tuple(directions.shape)}")
    D = directions.double()
    D = D / D.norm(dim=1, keepdim=True).clamp_min(1e-12)
    if center:
        if D.shape[0] < 2:
            raise ValueError("centred PCA needs at least two directions")
        D = D - D.mean(0)
    _, S, Vh = torch.linalg.svd(D, full_matrices=False)
    energy = S**2 / (S**2).sum()
    r = min(int((torch.cumsum(energy, 0) < variance - 1e-12).sum()) + 1, int((S > 1e-9 * S[0]).sum()))
    Q, R = torch.linalg.qr(Vh[:r].T)  # re-orthonormalised in float64
    signs = torch.sign(torch.diagonal(R))
    Q = Q * torch.where(signs == 0, 1.0, signs)  # deterministic orientation
    return Q.float().contiguous(), float(energy[:r].sum()), S.tolist()


def subspaces_from_features(saes: dict, selections: dict[int, FeatureSelection], variance: float = 0.8, *,
                            center: bool = False) -> dict[int, Subspace]:
    out = {}
    for layer, sel in selections.items():
        W_dec = saes[layer].W_dec.detach().float().cpu()
        U, explained, S = build_subspace(W_dec[sel.ids], variance, center=center)
        out[layer] = Subspace(layer, U, list(sel.ids), explained, S)
    return out


def save_subspaces(path: str, subspaces: dict[int, Subspace]) -> None:
    tensors = {f"layer{layer}.U": s.U.contiguous() for layer, s in subspaces.items()}
    tensors.update({f"layer{layer}.feature_ids": torch.tensor(s.feature_ids, dtype=torch.int64)
                    for layer, s in subspaces.items()})
    meta = {str(layer): json.dumps({"explained": s.explained, "singular_values": s.singular_values})
            for layer, s in subspaces.items()}
    save_file(tensors, path, metadata=meta)


def load_subspaces(path: str) -> dict[int, Subspace]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    tensors = load_file(path)
    out = {}
    for layer_s, info in meta.items():
        layer, info = int(layer_s), json.loads(info)
        out[layer] = Subspace(layer, tensors[f"layer{layer}.U"], tensors[f"layer{layer}.feature_ids"].tolist(),
                              info["explained"], info["singular_values"])
    return out


# ---- adapters ------------------------------------------------------------------------------------

# Linear layers of a decoder block whose output is added to the residual stream.
RESIDUAL_WRITERS = ("self_attn.o_proj", "mlp.down_proj", "attention.dense", "mlp.dense_4h_to_h",
                    "self_attn.out_proj", "mlp.fc2")


def residual_writers(model, layer: int) -> list[tuple[str, torch.nn.Linear]]:
    """(name, module) of the nn.Linear layers that write block ``layer``'s output to the residual stream."""
    check_layer(model, layer)
    block = decoder_layers(model)[layer]
    found = []
    for name in RESIDUAL_WRITERS:
        module = block
        try:
            for part in name.split("."):
                module = getattr(module, part)
        except AttributeError:
            continue
        if isinstance(module, torch.nn.Linear):
            found.append((f"layers.{layer}.{name}", module))
    if not found:
        raise ValueError(f"decoder layer {layer} of {type(model).__name__} has none of the residual writers "
                         f"{', '.join(RESIDUAL_WRITERS)} as nn.Linear")
    return found


class SubspaceAdapter(torch.nn.Module):
    """delta y = scale * U (B x): the output factor U [d_out, r] is fixed, only B [r, d_in] trains.

    B starts at zero (the model is unchanged until trained); the weight update U B lies in
    span(U) whatever B becomes.
    """

    def __init__(self, U: torch.Tensor, d_in: int, *, scale: float = 1.0):
        super().__init__()
        self.register_buffer("U", U.detach().clone())
        self.B = torch.nn.Parameter(torch.zeros(U.shape[1], d_in, dtype=U.dtype, device=U.device))
        self.scale = scale

    def forward(self, x):
        return (x @ self.B.T) @ self.U.T * self.scale

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.U @ self.B)


class LoRAAdapter(torch.nn.Module):
    """Plain LoRA: delta y = scale * B (A x), A [r, d_in] random, B [d_out, r] zero at the start."""

    def __init__(self, d_in: int, d_out: int, rank: int, *, scale: float = 1.0, generator=None, dtype=torch.float32,
                 device=None):
        super().__init__()
        bound = 1 / math.sqrt(d_in)
        A = (torch.rand(rank, d_in, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        self.A = torch.nn.Parameter(A.to(dtype=dtype, device=device))
        self.B = torch.nn.Parameter(torch.zeros(d_out, rank, dtype=dtype, device=device))
        self.scale = scale

    def forward(self, x):
        return (x @ self.A.T) @ self.B.T * self.scale

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.B @ self.A)


class WeightDelta(torch.nn.Module):
    """A fixed weight update as an adapter: delta y = x dW^T (how a saved projected-gradient update is applied)."""

    def __init__(self, delta: torch.Tensor):
        super().__init__()
        self.register_buffer("delta", delta.detach().clone())

    def forward(self, x):
        return x @ self.delta.T

    def delta_weight(self) -> torch.Tensor:
        return self.delta


class Adapters:
    """Adapters added to the outputs of Linear modules by forward hooks; the model's own modules and
    weights are left untouched (``remove()`` restores the model exactly)."""

    def __init__(self, targets: list[tuple[str, torch.nn.Linear, torch.nn.Module]]):
        self.targets = targets
        self.handles = [module.register_forward_hook(self._hook(adapter)) for _, module, adapter in targets]

    @staticmethod
    def _hook(adapter):
        def fn(module, args, output):
            return output + adapter(args[0]).to(output.dtype)
        return fn

    def parameters(self):
        return [p for _, _, a in self.targets for p in a.parameters()]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def delta_weights(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {name: a.delta_weight().float() for name, _, a in self.targets}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{k}": v.detach().contiguous()
                for name, _, a in self.targets for k, v in a.state_dict().items()}

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def attach_subspace_adapters(model, subspaces: dict[int, Subspace], *, scale: float = 1.0) -> Adapters:
    """Method (a): a :class:`SubspaceAdapter` on every residual writer of every subspace's layer."""
    targets = []
    for layer, sub in sorted(subspaces.items()):
        for name, module in residual_writers(model, layer):
            if module.out_features != sub.U.shape[0]:
                raise ValueError(f"{name} writes {module.out_features} features but U of layer {layer} is "
                                 f"{tuple(sub.U.shape)}")
            U = sub.U.to(device=module.weight.device, dtype=module.weight.dtype)
            targets.append((name, module, SubspaceAdapter(U, module.in_features, scale=scale)))
    return Adapters(targets)


def attach_lora_adapters(model, ranks: dict[int, int], *, scale: float = 1.0, seed: int = 0) -> Adapters:
    """Plain LoRA of rank ``ranks[layer]`` on the same modules (the comparison)."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    for layer, rank in sorted(ranks.items()):
        for name, module in residual_writers(model, layer):
            w = module.weight
            targets.append((name, module, LoRAAdapter(module.in_features, module.out_features, rank, scale=scale,
                                                      generator=g, dtype=w.dtype, device=w.device)))
    return Adapters(targets)


class ProjectedGradient:
    """Method (b): the full weights of the residual writers train, inside span(U) on the output side.

    Every gradient is projected by :func:`ssae_kernels.project_subspace` in a gradient hook (so the
    optimizer's moments see only in-span gradients), and after every optimizer step the weight's
    total update W - W0 is projected again in place (``after_step``): Adam divides each coordinate
    by its own scale, which would take the update out of the span. Use an optimizer without weight
    decay on these weights (decay pulls W itself, not its update, towards 0).
    """

    def __init__(self, model, subspaces: dict[int, Subspace]):
        self.targets = []
        for layer, sub in sorted(subspaces.items()):
            for name, module in residual_writers(model, layer):
                w = module.weight
                U = sub.U.to(device=w.device, dtype=w.dtype)
                self.targets.append((name, w, U, w.detach().clone()))
        self.handles = []
        for _, w, U, _ in self.targets:
            w.requires_grad_(True)
            self.handles.append(w.register_hook(lambda g, U=U: project_subspace(g, U)))

    def parameters(self):
        return [w for _, w, _, _ in self.targets]

    def num_trainable(self) -> int:
        return sum(w.numel() for w in self.parameters())

    def num_effective(self) -> int:
        """Degrees of freedom of the update: r x d_in per weight."""
        return sum(U.shape[1] * w.shape[1] for _, w, U, _ in self.targets)

    @torch.no_grad()
    def after_step(self):
        for _, w, U, w0 in self.targets:
            delta = w - w0
            project_subspace_(delta, U)
            w.copy_(w0 + delta)

    def delta_weights(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {name: w.double() - w0.double() for name, w, _, w0 in self.targets}

    @torch.no_grad()
    def restore(self):
        """Puts the original weights back and removes the hooks."""
        for h in self.handles:
            h.remove()
        self.handles = []
        for _, w, _, w0 in self.targets:
            w.copy_(w0)
            w.requires_grad_(False)


# ---- saved adapters --------------------------------------------------------------------------------

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter.json", "adapter.safetensors"
_FINGERPRINT = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")


def model_fingerprint(model) -> dict:
    """The model's config entries an adapter depends on."""
    return {k: getattr(model.config, k, None) for k in _FINGERPRINT}


def save_adapter(directory: str, method: str, tensors: dict[str, torch.Tensor], model, model_source: str,
                 **info) -> None:
    """Writes ``directory``/adapter.json (method, model, its fingerprint, modules, ``info``) and
    adapter.safetensors: ``{module}.U`` and ``.B`` (subspace), ``.A`` and ``.B`` (lora) or ``.delta``
    (projected: the weight update)."""
    os.makedirs(directory, exist_ok=True)
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors})
    config = {"method": method, "model": model_source, "model_config": model_fingerprint(model), "modules": modules,
              **info}
    save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()},
              os.path.join(directory, ADAPTER_WEIGHTS))
    with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)


def read_adapter_config(directory: str) -> dict:
    path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file (--adapter must be a directory written by ssae subspace)")
    with open(path) as f:
        return json.load(f)


def load_adapter(model, directory: str) -> Adapters:
    """Attaches the adapter saved in ``directory`` to ``model`` (``remove()`` takes it off again). Raises
    ValueError naming adapter.json when it was made for a model of another shape."""
    config = read_adapter_config(directory)
    path = os.path.join(directory, ADAPTER_CONFIG)
    mine = model_fingerprint(model)
    differ = {k: (v, mine.get(k)) for k, v in config["model_config"].items() if mine.get(k) != v}
    if differ:
        raise ValueError(f"{path}: the adapter was made for {config['model']!r}, whose config differs from this "
                         f"model's: {', '.join(f'{k} {a} vs {b}' for k, (a, b) in differ.items())}")
    tensors = load_file(os.path.join(directory, ADAPTER_WEIGHTS))
    targets = []
    for name in config["modules"]:
        layer = int(name.split(".")[1])
        module = dict(residual_writers(model, layer)).get(name)
        if module is None:
            raise ValueError(f"{path}: module {name} is not a residual writer of this model")
        w = module.weight
        get = lambda part: tensors[f"{name}.{part}"].to(device=w.device, dtype=w.dtype)  # noqa: E731
        if config["method"] == "subspace":
            adapter = SubspaceAdapter(get("U"), module.in_features)
            adapter.B.data.copy_(get("B"))
        elif config["method"] == "lora":
            adapter = LoRAAdapter(module.in_features, module.out_features, get("A").shape[0], dtype=w.dtype,
                                  device=w.device)
            adapter.A.data.copy_(get("A"))
            adapter.B.data.copy_(get("B"))
        elif config["method"] == "projected":
            adapter = WeightDelta(get("delta"))
        else:
            raise ValueError(f"{path}: unknown method {config['method']!r}")
        if adapter.delta_weight().shape != w.shape:
            raise ValueError(f"{path}: {name} is {tuple(adapter.delta_weight().shape)} in the adapter, "
                             f"{tuple(w.shape)} in this model")
        for p in adapter.parameters():
            p.requires_grad_(False)
        targets.append((name, module, adapter))
    return Adapters(targets)


def out_of_span(deltas: dict[str, torch.Tensor], subspaces: dict[int, Subspace]) -> dict[str, float]:
    """||(I - U U^T) dW|| / ||dW|| of each weight update (Frobenius), by the fused complement projection
    in float64; 0 for an update that is exactly zero."""
    out = {}
    for name, dW in deltas.items():
        layer = int(name.split(".")[1])
        U = subspaces[layer].U.to(dtype=torch.float64, device=dW.device)
        d = dW.double()
        norm = float(d.norm())
        out[name] = float(project_subspace(d, U, complement=True).norm()) / norm if norm > 0 else 0.0
    return out

