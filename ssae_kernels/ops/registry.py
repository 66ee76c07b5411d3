"""Every ssae op is declared once, by :func:`define` in its own module.

A declaration holds the schema, the argument checks (run eagerly and by the fake
kernel), the fake kernel, the reference definition, the autograd formulas and,
per backend, the dtypes it serves and any size limit. Everything else is derived
from it:

- the ``ssae`` torch.library namespace (schema, fake kernel, autograd);
- the backend registry (:mod:`ssae_kernels.backends`): which backend has a kernel
  for the op, for which dtypes, and where it lives (the Triton launcher is the
  function of the op's name in ``ssae_kernels/triton/<module>.py``);
- ``ssae_kernels.reference`` and the op x backend x dtype table of ``python -m ssae_kernels.info``.

The C++ backends register their kernels under the CPU and CUDA dispatch keys
(csrc/torch/bindings.cpp), so a call they serve runs with no Python after
``torch.ops``. They hand a call to :func:`route` when another backend is asked
for or preferred; :func:`install` registers ``route`` itself as the kernel of any
dispatch key the compiled extension leaves free (CUDA tensors without the CUDA
build, everything without the extension).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import torch

LIBRARY = torch.library.Library("ssae", "DEF")

# Op name -> declaration, in the order the op modules define them.
OPS: dict[str, "Op"] = {}

_REQUIRED = object()  # a schema argument without a default


@dataclasses.dataclass(frozen=True, eq=False)
class Op:
    name: str
    module: str  # ssae_kernels/ops/<module>.py; other backends' kernels live in modules of this name
    schema: str
    check: Callable  # raises TypeError/ValueError/IndexError naming the argument
    reference: Callable  # the pure-PyTorch definition: the specification
    dtypes: Mapping[str, tuple]  # backend -> dtypes it serves (of the leading tensor); None: any
    limits: Mapping[str, Callable]  # backend -> f(*args) -> why a call is too large for it, or None
    defaults: tuple  # per schema argument: its default, or _REQUIRED
    composite: bool  # built from other ssae ops: one kernel for every device, no backend of its own
    function: type | None  # the autograd formulas as a torch.autograd.Function (see call)

    @property
    def overload(self) -> torch._ops.OpOverload:
        return getattr(torch.ops.ssae, self.name).default

    def complete(self, args: tuple) -> tuple:
        """The dispatcher drops trailing arguments equal to their defaults; put them back."""
        if len(args) < len(self.defaults):
            args = args + self.defaults[len(args):]
        return args

    def served_by(self, backend: str) -> bool:
        return backend == "reference" or backend in self.dtypes


def define(name: str, schema: str, *, module: str, check: Callable, fake: Callable, reference: Callable,
           dtypes: Mapping[str, tuple], limits: Mapping[str, Callable] | None = None,
           backward: Callable | None = None, setup_context: Callable | None = None,
           composite: Callable | None = None) -> Op:
    """Declares ``ssae::<name><schema>`` with everything that belongs to it.

    ``module``: the op module's name (``__name__.rsplit('.', 1)[-1]``); ``fake(*args)`` builds the
    outputs' metadata once ``check(*args)`` has passed; ``dtypes``: for each backend with a kernel
    for the op, the dtypes it serves (the reference backend serves every op and dtype);
    ``composite``: the kernel of an op built from other ssae ops (no backend of its own).
    """
    if name in OPS:
        raise RuntimeError(f"ssae::{name} is declared twice")
    LIBRARY.define(name + schema)
    parsed = torch._C.parse_schema(f"ssae::{name}{schema}")
    defaults = tuple(a.default_value if a.has_default_value() else _REQUIRED for a in parsed.arguments)
    function = None if backward is None else _autograd_function(name, backward, setup_context)
    op = Op(name=name, module=module, schema=schema, check=check, reference=reference, dtypes=dict(dtypes),
            limits=dict(limits or {}), defaults=defaults, composite=composite is not None, function=function)

    def fake_kernel(*args):
        args = op.complete(args)
        check(*args)
        return fake(*args)

    torch.library.register_fake(f"ssae::{name}", fake_kernel, lib=LIBRARY)
    if backward is not None:
        torch.library.register_autograd(f"ssae::{name}", backward, setup_context=setup_context, lib=LIBRARY)
    if composite is not None:
        LIBRARY.impl(name, composite, "CompositeExplicitAutograd")
    OPS[name] = op
    return op


def _autograd_function(name, backward, setup_context):
    """The op's autograd formulas (the same ones register_autograd installs) as an autograd.Function."""
    overload = getattr(torch.ops.ssae, name).default

    def forward(ctx, *args):
        with torch._C._AutoDispatchBelowAutograd():
            output = overload(*args)
        setup_context(ctx, args, output)
        return output

    return type(f"{name}_function", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})


def call(name: str, args: tuple, differentiable: tuple):
    """``torch.ops.ssae.<name>(*args)`` from a public function, at the least Python cost.

    torch.library's autograd kernel is Python and generic (it boxes the call, fills
    defaults, redispatches): passing a small call through it costs more than the
    call itself (bench_overhead.py). Eagerly, a call that needs no gradient skips
    the autograd layer, and one that does runs the op's formulas as an
    autograd.Function. Under torch.compile the dispatcher's registration is used.
    """
    op = OPS[name]
    overload = op.overload
    if torch.compiler.is_compiling():
        return overload(*args)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in differentiable):
        return op.function.apply(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return overload(*args)


def route(name: str, native: str | None, *args):
    """Serves a call of ``ssae::<name>`` with the backend chosen for it.

    Called by the C++ backends' kernels (``native`` = "cpu" or "cuda") when they do not
    serve a call themselves; returns NotImplemented to hand the call back when the
    choice falls on that backend after all. The reference and Triton backends run here.
    """
    from .. import backends

    op = OPS[name]
    args = op.complete(args)
    op.check(*args)  # first: bad input is reported as such, not as a backend that cannot serve it
    backend = backends.select(op, args)
    if backend.name == native:
        return NotImplemented
    return backend.kernel(op)(*args)


def _python_kernel(op: Op):
    def kernel(*args):
        return route(op.name, None, *args)

    kernel.__name__ = f"{op.name}_routed"
    return kernel


def install(extension) -> None:
    """Connects the ops to the backends, once every op module has declared its ops.

    ``extension`` (ssae_kernels._C, or None when it is not available) has registered its
    kernels when it was loaded; the router serves every other (op, dispatch key).
    """
    if extension is not None:
        extension.set_router(route)
    for op in OPS.values():
        if op.composite:
            continue
        for key in ("CPU", "CUDA"):
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"ssae::{op.name}", key):
                LIBRARY.impl(op.name, _python_kernel(op), key)
