"""sparse_adam_ (ssae_kernels/ops/sparse_adam.py) on every backend: against the reference and against
torch.optim.Adam, untouched rows, views, opcheck, bad input; then backend-specific tests, marked."""

import pytest
import torch

from ssae_kernels import reference
from ssae_kernels.ops import sparse_adam_

from .conftest import as_view, cpu_sized, device_of, interpreter, require, triton_module

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
# fp32: a few roundings of each of two updates of size lr; fp64 far below
TOL = {torch.float32: 1e-6, torch.float64: 1e-13}


def problem(M, d, R, dtype=torch.float32, device="cpu", *, seed=0, skipped=True):
    """(param, exp_avg, exp_avg_sq, rows, grad, catchup): states as after some steps, R random rows,
    a catch-up table of a few skipped steps (or none), and one row whose moments are still zero."""
    g = torch.Generator().manual_seed(seed)
    param = torch.randn(M, d, generator=g, dtype=torch.float64)
    exp_avg = torch.randn(M, d, generator=g, dtype=torch.float64) * 1e-2
    exp_avg_sq = torch.rand(M, d, generator=g, dtype=torch.float64) * 1e-4
    exp_avg[0], exp_avg_sq[0] = 0, 0
    rows = torch.randperm(M, generator=g)[:R]
    grad = torch.randn(R, d, generator=g, dtype=torch.float64)
    s = torch.randint(0, 5, (R,), generator=g).double() if skipped else torch.zeros(R, dtype=torch.float64)
    catchup = torch.stack([1e-3 * s, 0.9**s, 0.999**s, torch.full_like(s, 1e-8)], 1)
    cast = lambda t: t.to(device, dtype)  # noqa: E731
    return cast(param), cast(exp_avg), cast(exp_avg_sq), rows.to(device), cast(grad), cast(catchup)


SHAPES = [(1, 1, 1), (10, 3, 4), (37, 130, 20), (50, 17, 50), cpu_sized(300, 576, 129)]


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("M,d,R", SHAPES)
@pytest.mark.parametrize("with_grad", [True, False])
def test_matches_reference(backend, dtype, M, d, R, with_grad):
    require(backend, "sparse_adam_", dtype=dtype)
    args = list(problem(M, d, R, dtype, device_of(backend)))
    if not with_grad:
        args[4] = None
    expected = [t.clone() for t in args[:3]]
    reference.sparse_adam_(*expected, *args[3:], step=7, **HYPER)
    before = [t.clone() for t in args[:3]]
    sparse_adam_(*args, step=7, **HYPER)
    untouched = torch.ones(M, dtype=torch.bool)
    untouched[args[3].cpu()] = False
    for out, exp, old in zip(args[:3], expected, before):
        torch.testing.assert_close(out, exp, rtol=TOL[dtype], atol=TOL[dtype])
        assert torch.equal(out[untouched.to(out.device)], old[untouched.to(out.device)])  # not even rewritten


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_equals_torch_adam_when_nothing_was_skipped(backend, dtype):
    # With every row listed and an empty catch-up it is torch.optim.Adam's step, three steps running.
    require(backend, "sparse_adam_", dtype=dtype)
    dev = device_of(backend)
    M, d = 23, 40
    ours = torch.randn(M, d, dtype=dtype, device=dev)
    theirs = ours.clone().requires_grad_()
    adam = torch.optim.Adam([theirs], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                            foreach=False)
    m, v = torch.zeros_like(ours), torch.zeros_like(ours)
    rows = torch.arange(M, device=dev)
    empty = torch.tensor([[0.0, 1.0, 1.0, 1.0]], dtype=dtype, device=dev).expand(M, 4)
    for step in range(1, 4):
        grad = torch.randn(M, d, dtype=dtype, device=dev)
        theirs.grad = grad.clone()
        adam.step()
        sparse_adam_(ours, m, v, rows, grad, empty, step=step, **HYPER)
    torch.testing.assert_close(ours, theirs.detach(), rtol=TOL[dtype], atol=TOL[dtype])
    # (torch forms m with lerp: the same value, rounded differently where m is near zero)
    torch.testing.assert_close(m, adam.state[theirs]["exp_avg"], rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(v, adam.state[theirs]["exp_avg_sq"], rtol=TOL[dtype], atol=TOL[dtype])


# ---- bfloat16 moments, stored with stochastic rounding ------------------------------------------------


def bf16_moments(args):
    return [args[0], args[1].bfloat16(), args[2].bfloat16(), *args[3:]]


def assert_bf16_rounding_close(out, expected):
    """bfloat16 moments of a backend against the reference's: the same bits except where the float32 values
    before rounding straddle a rounding boundary (then by one bfloat16 step). The kernels round 1 - beta2 to
    float32 (1e-5 relative off the reference's), so about 1e-5 / 2^-8 = 0.3% of the v's flip."""
    assert out.dtype == torch.bfloat16
    differ = out.cpu() != expected.cpu()
    assert differ.float().mean() <= 1e-2, f"{int(differ.sum())} of {differ.numel()} moments differ"
    torch.testing.assert_close(out.float(), expected.float(), rtol=2**-7, atol=0)


@pytest.mark.parametrize("M,d,R", SHAPES)
@pytest.mark.parametrize("with_grad", [True, False])
def test_bfloat16_moments_match_reference(backend, M, d, R, with_grad):
    require(backend, "sparse_adam_", dtype=torch.float32)
    args = bf16_moments(problem(M, d, R, device=device_of(backend)))
    if not with_grad:
        args[4] = None
    expected = [t.clone() for t in args[:3]]
    reference.sparse_adam_(*expected, *args[3:], step=7, seed=3, **HYPER)
    before = [t.clone() for t in args[:3]]
    sparse_adam_(*args, step=7, seed=3, **HYPER)
    torch.testing.assert_close(args[0], expected[0], rtol=TOL[torch.float32], atol=TOL[torch.float32])
    for out, exp in zip(args[1:3], expected[1:3]):
        assert_bf16_rounding_close(out, exp)
    untouched = torch.ones(M, dtype=torch.bool)
    untouched[args[3].cpu()] = False
    for out, old in zip(args[:3], before):
        assert torch.equal(out[untouched.to(out.device)], old[untouched.to(out.device)])


def test_bfloat16_moments_decay_in_expectation(backend):
    # A moment of 1.0 decayed by 0.999 a step: round-to-nearest would keep it at 1.0 forever (bfloat16's
    # step below 1 is 2^-8); stochastic rounding follows 0.999^s on average.
    require(backend, "sparse_adam_", dtype=torch.float32)
    dev = device_of(backend)
    M, d, steps = 32, 128, 20
    p = torch.zeros(M, d, device=dev)
    m, v = torch.ones(M, d, dtype=torch.bfloat16, device=dev), torch.ones(M, d, dtype=torch.bfloat16, device=dev)
    rows = torch.arange(M, device=dev)
    decay = torch.tensor([[0.0, 0.9, 0.999, 1.0]], device=dev).expand(M, 4)
    for step in range(1, steps + 1):
        sparse_adam_(p, m, v, rows, None, decay, step=step, **HYPER)
    # 4096 draws a step: the mean is within a few 1e-5 of its expectation (bound: 6 standard deviations);
    # round-to-nearest would leave v at 1, 0.02 away
    assert abs(v.float().mean().item() - 0.999**steps) < 3e-4
    assert abs(m.float().mean().item() - 0.9**steps) < 0.9**steps * 2e-3


def test_bfloat16_rounding_depends_on_seed_and_step_only(backend):
    require(backend, "sparse_adam_", dtype=torch.float32)
    args = bf16_moments(problem(40, 33, 30, device=device_of(backend)))

    def run(seed, step):
        out = [t.clone() for t in args[:3]]
        sparse_adam_(*out, *args[3:], step=step, seed=seed, **HYPER)
        return out[1]

    assert torch.equal(run(1, 4), run(1, 4))
    assert not torch.equal(run(1, 4), run(2, 4)) and not torch.equal(run(1, 4), run(1, 5))


def test_zero_moments_do_not_move_with_zero_eps_skip(backend):
    # A row never touched has m = v = 0: its catch-up is 0, not 0 / 0.
    require(backend, "sparse_adam_", dtype=torch.float32)
    dev = device_of(backend)
    p, m, v = torch.ones(3, 4, device=dev), torch.zeros(3, 4, device=dev), torch.zeros(3, 4, device=dev)
    catchup = torch.tensor([[5.0, 0.5, 0.5, 0.0]], device=dev)
    sparse_adam_(p, m, v, torch.tensor([1], device=dev), None, catchup, step=3, **HYPER)
    assert torch.equal(p, torch.ones(3, 4, device=dev)) and not m.any() and not v.any()


@pytest.mark.parametrize("view", ["transposed", "sliced"])
def test_views(backend, view):
    require(backend, "sparse_adam_", dtype=torch.float32)
    dev = device_of(backend)
    args = list(problem(29, 33, 11, device=dev))
    expected = [t.clone() for t in args[:3]]
    reference.sparse_adam_(*expected, *args[3:], step=2, **HYPER)
    views = [as_view(t, view) for t in args[:3]]
    grad = as_view(args[4], view)
    rows = torch.stack([args[3], args[3]], 1)[:, 0]  # a strided index vector
    sparse_adam_(*views, rows, grad, as_view(args[5], "transposed"), step=2, **HYPER)
    for out, exp in zip(views, expected):
        torch.testing.assert_close(out, exp, rtol=1e-6, atol=1e-6)


def test_empty_rows_is_a_no_op(backend):
    require(backend, "sparse_adam_", dtype=torch.float32)
    dev = device_of(backend)
    p, m, v, *_ = problem(5, 4, 1, device=dev)
    before = p.clone()
    sparse_adam_(p, m, v, torch.zeros(0, dtype=torch.int64, device=dev), torch.zeros(0, 4, device=dev),
                 torch.zeros(0, 4, device=dev), step=1, **HYPER)
    assert torch.equal(p, before)


def test_opcheck():
    args = problem(12, 5, 6)
    torch.library.opcheck(torch.ops.ssae.sparse_adam_.default, (*args, 1e-2, 0.9, 0.999, 1e-8, 3))
    torch.library.opcheck(torch.ops.ssae.sparse_adam_.default, (*args[:4], None, args[5], 1e-2, 0.9, 0.999, 1e-8, 3))
    torch.library.opcheck(torch.ops.ssae.sparse_adam_.default, (*bf16_moments(args), 1e-2, 0.9, 0.999, 1e-8, 3, 5))


def _bad(**override):
    p, m, v, rows, grad, catchup = problem(10, 4, 3)
    args = dict(param=p, exp_avg=m, exp_avg_sq=v, rows=rows, grad=grad, catchup=catchup, step=1, **HYPER)
    args.update(override)
    return args


BAD = [
    (dict(rows=torch.tensor([1, 4, 1])), ValueError, "rows must be distinct"),
    (dict(rows=torch.tensor([1, 10, 2])), IndexError, r"rows must lie in \[0, 10\)"),
    (dict(rows=torch.tensor([1, -1, 2])), IndexError, r"rows must lie in \[0, 10\)"),
    (dict(rows=torch.tensor([1, 2, 3], dtype=torch.int32)), TypeError, "rows must be int64"),
    (dict(grad=torch.randn(2, 4)), ValueError, r"grad must be \[R, d\]"),
    (dict(catchup=torch.randn(3, 3)), ValueError, r"catchup must be \[R, 4\]"),
    (dict(exp_avg=torch.zeros(10, 5)), ValueError, "exp_avg must have the shape of param"),
    (dict(exp_avg_sq=torch.zeros(10, 4, dtype=torch.float64)), TypeError, "exp_avg_sq has dtype"),
    (dict(param=torch.zeros(10, 4, dtype=torch.bfloat16)), TypeError, "param must be float32 or float64"),
    (dict(param=torch.zeros(10, 4, dtype=torch.float64), exp_avg=torch.zeros(10, 4, dtype=torch.bfloat16),
          exp_avg_sq=torch.zeros(10, 4, dtype=torch.bfloat16)), TypeError, r"or bfloat16 with a float32 param"),
    (dict(exp_avg=torch.zeros(10, 4, dtype=torch.float16), exp_avg_sq=torch.zeros(10, 4, dtype=torch.float16)),
     TypeError, r"exp_avg and exp_avg_sq must have param's dtype"),
    (dict(exp_avg=torch.zeros(10, 4, dtype=torch.bfloat16)), TypeError, "exp_avg_sq has dtype"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(step=0), ValueError, "step must be >= 1"),
    (dict(beta1=1.0), ValueError, r"beta1 must be in \[0, 1\)"),
    (dict(lr=float("nan")), ValueError, "lr must be finite"),
    (dict(eps=-1.0), ValueError, "eps must be finite and >= 0"),
    (dict(param=torch.zeros(10, 1).expand(10, 4)), ValueError, "param has overlapping elements"),
    (dict(grad="no"), TypeError, "grad must be a torch.Tensor or None"),
]


@pytest.mark.parametrize("override,error,match", BAD)
def test_bad_input(backend, override, error, match):
    require(backend, "sparse_adam_", dtype=torch.float32, device="cpu")
    args = _bad(**override)
    with pytest.raises(error, match=match):
        sparse_adam_(**args)


def test_rejects_tensors_recording_grad():
    args = _bad(param=torch.zeros(10, 4, requires_grad=True))
    with pytest.raises(RuntimeError, match="not differentiable"):
        sparse_adam_(**args)
    with torch.no_grad():
        sparse_adam_(**args)


def test_cpu_kernel_checks_its_arguments():
    # torch.ops on CPU tensors reaches the C++ kernel without the Python checks.
    require("cpu", "sparse_adam_", dtype=torch.float32)
    op = torch.ops.ssae.sparse_adam_.default
    p, m, v, rows, grad, catchup = problem(10, 4, 3)
    import ssae_kernels
    with ssae_kernels.use_backend("cpu"):
        with pytest.raises(ValueError, match="rows must be distinct"):
            op(p, m, v, torch.tensor([2, 2, 3]), grad, catchup, 0.1, 0.9, 0.999, 1e-8, 1)
        with pytest.raises(IndexError, match=r"rows must lie in \[0, 10\), got 12"):
            op(p, m, v, torch.tensor([2, 12, 3]), grad, catchup, 0.1, 0.9, 0.999, 1e-8, 1)
        with pytest.raises(ValueError, match=r"catchup must be \[R, 4\]"):
            op(p, m, v, rows, grad, catchup[:, :3], 0.1, 0.9, 0.999, 1e-8, 1)


# ---- GPU backends at GPU scale ------------------------------------------------------------------------


@pytest.mark.parametrize("M,d,R", [(4096, 576, 1000), (70000, 64, 65537), (1000, 2304, 999)])
@pytest.mark.parametrize("with_grad", [True, False])
@pytest.mark.parametrize("moments", ["float32", "bfloat16"])
def test_gpu_sparse_adam(gpu_backend, M, d, R, with_grad, moments):
    args = list(problem(M, d, R, torch.float32, "cuda"))
    if moments == "bfloat16":
        args = bf16_moments(args)
    if not with_grad:
        args[4] = None
    expected = [t.clone() for t in args[:3]]
    reference.sparse_adam_(*expected, *args[3:], step=11, seed=2, **HYPER)
    sparse_adam_(*args, step=11, seed=2, **HYPER)
    torch.testing.assert_close(args[0], expected[0], rtol=1e-6, atol=1e-6)
    for out, exp in zip(args[1:3], expected[1:3]):
        if moments == "bfloat16":
            assert_bf16_rounding_close(out, exp)
        else:
            torch.testing.assert_close(out, exp, rtol=1e-6, atol=1e-6)


# ---- triton backend only (interpreter) ---------------------------------------------------------------


@interpreter
@pytest.mark.parametrize("M,d,R", [(9, 1030, 5), (60, 64, 40), (7, 1, 7)])
@pytest.mark.parametrize("with_grad", [True, False])
@pytest.mark.parametrize("moments", ["float32", "bfloat16"])
def test_triton_gpu_tiles(M, d, R, with_grad, moments):
    # The GPU's tile shapes (the interpreter's own are small): a row across two 1024-column blocks,
    # several rows a program, a column a row.
    triton_adam = triton_module("sparse_adam")
    cfg = triton_adam.GPU_CONFIG
    block_r, block_d = triton_adam.tile_shape(d, cfg["TILE"], cfg["MAX_BLOCK_D"])
    assert block_r * block_d == cfg["TILE"] and (d > block_d or R > block_r or d == 1)
    args = list(problem(M, d, R))
    if moments == "bfloat16":
        args = bf16_moments(args)
    if not with_grad:
        args[4] = None
    expected = [t.clone() for t in args[:3]]
    reference.sparse_adam_(*expected, *args[3:], step=5, seed=1, **HYPER)
    triton_adam.sparse_adam_(*args, step=5, seed=1, tile=cfg["TILE"], max_block_d=cfg["MAX_BLOCK_D"], **HYPER)
    torch.testing.assert_close(args[0], expected[0], rtol=1e-6, atol=1e-6)
    for out, exp in zip(args[1:3], expected[1:3]):
        if moments == "bfloat16":
            assert_bf16_rounding_close(out, exp)  # (the interpreter computes the reference's bits)
        else:
            torch.testing.assert_close(out, exp, rtol=1e-6, atol=1e-6)


@interpreter
def test_triton_leaves_out_of_range_rows_alone():
    # Unchecked (GPU tensors without SSAE_CHECK_INDICES=1): a row outside [0, M) is neither read nor
    # written, the others are updated.
    triton_adam = triton_module("sparse_adam")
    args = list(problem(10, 20, 4))
    args[3] = torch.tensor([3, -1, 10, 7])
    expected = [t.clone() for t in args[:3]]
    keep = torch.tensor([0, 3])
    reference.sparse_adam_(*expected, args[3][keep], args[4][keep], args[5][keep], step=2, **HYPER)
    triton_adam.sparse_adam_(*args, step=2, **HYPER)
    for out, exp in zip(args[:3], expected):
        torch.testing.assert_close(out, exp, rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="float32 only"):
        triton_adam.sparse_adam_(*(t.double() for t in args[:3]), args[3], None, args[5].double(), step=2, **HYPER)
