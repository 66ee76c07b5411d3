"""benchmarks/gpu_model.py: the SASS classifier and region analysis, the selection replay against a
plain-loop reference, and the schema of the written results (no GPU, a few seconds)."""

from __future__ import annotations

import json
import math
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_model as gm  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "gpu_model.json"


# ---- SASS classification and control flow ----------------------------------------------------


def test_classify_table():
    assert gm.classify("HGMMA.64x128x16.F32.BF16") == ("tensor", "tensor")
    assert gm.classify("HMMA.16816.F32.BF16") == ("tensor", "tensor")
    assert gm.classify("FFMA") == ("fp32", "fma")
    assert gm.classify("FMNMX") == ("fp32", "alu")
    assert gm.classify("IMAD.WIDE.U32") == ("int", "fma")
    assert gm.classify("ISETP.GT.U32.AND") == ("int", "alu")
    assert gm.classify("LOP3.LUT") == ("int", "alu")
    assert gm.classify("F2I.FTZ.TRUNC") == ("conversion", "xu")
    assert gm.classify("LDGSTS.E.BYPASS.LTC128B.128") == ("memory", "lsu")
    assert gm.classify("UTMALDG.2D") == ("memory", "tma")
    assert gm.classify("SHFL.BFLY") == ("shfl", "lsu")
    assert gm.classify("BAR.SYNC.DEFER_BLOCKING") == ("bar", "cbu")
    assert gm.classify("ULDC.64") == ("uniform", "uniform")
    assert gm.classify("WHATEVER") == ("other", "misc")
    assert gm.access_bytes("LDG.E.128") == 16 and gm.access_bytes("STS.64") == 8 and gm.access_bytes("LDS") == 4
    assert gm.access_bytes("LDG.E.U16") == 2
    flops, smem, a_regs = gm.wgmma_operands("HGMMA.64x128x16.F32.BF16", "R24, gdesc[UR8], R24")
    assert (flops, smem, a_regs) == (2 * 64 * 128 * 16, (128 + 64) * 16 * 2, 0)
    assert gm.wgmma_operands("HGMMA.64x256x16.F32.BF16", "R24, R120, gdesc[UR8], R24")[1:] == (256 * 16 * 2, 1)


# a kernel source and nvdisasm-style SASS of it: a tile loop around a K loop with an HGMMA, an if
# inside the tile loop whose body calls a helper with a 4-trip loop, and a 2-trip loop after
KERNEL_SRC = '''\
import triton
import triton.language as tl


@triton.jit
def _helper(p, ROWS: tl.constexpr, CHUNK: tl.constexpr):
    for r in range(0, ROWS, CHUNK):
        tl.store(p + r, 0)


@triton.jit
def kern(p, D, T, ROWS: tl.constexpr, CHUNK: tl.constexpr, BK: tl.constexpr):
    for t in range(0, T):
        acc = tl.zeros([64, 64], tl.float32)
        for k0 in range(0, D, BK):
            acc = tl.dot(acc, acc, acc)
        x = tl.sum(acc)
        if x > 0:
            _helper(p, ROWS, CHUNK)
    for q in range(0, 2):
        tl.store(p + q, 1)
'''


def _sass(path):
    f = f'"{path}"'
    return textwrap.dedent(f"""\
        .text.kern:
        \t//## File {f}, line 13
                /*0000*/                   S2R R0, SR_TID.X ;
        .L_x_0:
        \t//## File {f}, line 14
                /*0010*/                   IADD3 R1, R1, 0x1, RZ ;
        .L_x_1:
        \t//## File {f}, line 16
                /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
                /*0030*/                   LDGSTS.E.BYPASS.LTC128B.128 [R2], desc[UR4][R4.64] ;
                /*0040*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        \t//## File {f}, line 15
                /*0050*/               @P0 BRA `(.L_x_1) ;
        \t//## File {f}, line 17
                /*0060*/                   FADD R5, R5, R6 ;
                /*0070*/                   SHFL.BFLY PT, R6, R5, 0x1, 0x1f ;
                /*0080*/                   FSETP.GT.AND P1, PT, R5, RZ, PT ;
        \t//## File {f}, line 18
                /*0090*/              @!P1 BRA `(.L_x_3) ;
        .L_x_2:
        \t//## File {f}, line 19
                /*00a0*/                   STG.E [R8.64], RZ ;
                /*00b0*/                   IADD3 R9, R9, 0x1, RZ ;
                /*00c0*/               @P2 BRA `(.L_x_2) ;
        .L_x_3:
        \t//## File {f}, line 13
                /*00d0*/               @P3 BRA `(.L_x_0) ;
        .L_x_4:
        \t//## File {f}, line 21
                /*00e0*/                   STG.E [R8.64], R10 ;
                /*00f0*/               @P4 BRA `(.L_x_4) ;
                /*0100*/                   EXIT ;
        .L_x_5:
                /*0110*/                   BRA `(.L_x_5);
        """)


def test_analyse_sass_regions(tmp_path):
    src = tmp_path / "kern_module.py"
    src.write_text(KERNEL_SRC)
    ks = gm.analyse_sass(_sass(src), str(src), "kern", dict(ROWS=16, CHUNK=4, BK=64, D=256), warps=4)
    assert ks.k_loop_source.startswith("for k0 in range(0, D, BK)")
    assert ks.tile_loop_source.startswith("for t in range(0, T)")
    r = ks.regions
    assert r["k_step"].groups == {"tensor": 1, "memory": 1, "bar": 1, "control": 1}
    assert r["k_step"].wgmma_flops == 2 * 64 * 64 * 16 / 4
    assert r["tile"].groups["fp32"] == 2 and r["tile"].groups["shfl"] == 1
    event = next(v for k, v in r.items() if k.startswith("event:18"))
    assert event.trips == 4 and event.calls == ("_helper",) and event.groups == {"memory": 1, "int": 1, "control": 1}
    after = next(v for k, v in r.items() if k.startswith("program / for q"))
    assert after.trips == 2 and after.instructions == 2
    trap = next(v for k, v in r.items() if "trap" in k)
    assert trap.trips == 0
    # tile: IADD3, FADD, SHFL, FSETP, BRA (the if), BRA (the latch); 4 warps, 4 dispatches per clock
    assert r["tile"].instructions == 6
    rates = gm.A("pipe_rates")
    assert r["tile"].issue_clk(warps=4) == pytest.approx(max(6 * 4 / 4, 2 * 4 / rates["alu"], 4 / rates["lsu"]))


# a helper's loop calling a nested helper's loop twice, the second time behind an if: Triton's line
# info names only the kernel's call site for all of it
NESTED_SRC = """\
import triton
import triton.language as tl


@triton.jit
def _bits(p, BITS: tl.constexpr):
    for bit in range(BITS - 1, -1, -1):
        tl.store(p + bit, 0)


@triton.jit
def _helper(p, ROWS: tl.constexpr, CHUNK: tl.constexpr):
    for r in range(0, ROWS, CHUNK):
        _bits(p, 5)
        if r > 0:
            _bits(p, 5)


@triton.jit
def kern(p, D, T, ROWS: tl.constexpr, CHUNK: tl.constexpr, BK: tl.constexpr):
    for t in range(0, T):
        acc = tl.zeros([64, 64], tl.float32)
        for k0 in range(0, D, BK):
            acc = tl.dot(acc, acc, acc)
        x = tl.sum(acc)
        if x > 0:
            _helper(p, ROWS, CHUNK)
"""


def _nested_sass(path):
    f = f'"{path}"'
    return textwrap.dedent(f"""\
        .text.kern:
        \t//## File {f}, line 21
                /*0000*/                   S2R R0, SR_TID.X ;
        .L_x_0:
        \t//## File {f}, line 22
                /*0010*/                   IADD3 R1, R1, 0x1, RZ ;
        .L_x_1:
        \t//## File {f}, line 24
                /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
                /*0030*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        \t//## File {f}, line 23
                /*0040*/               @P0 BRA `(.L_x_1) ;
        \t//## File {f}, line 25
                /*0050*/                   FSETP.GT.AND P1, PT, R5, RZ, PT ;
        \t//## File {f}, line 26
                /*0060*/              @!P1 BRA `(.L_x_9) ;
        .L_x_2:
        \t//## File {f}, line 27
                /*0070*/                   IADD3 R9, R9, 0x1, RZ ;
        .L_x_3:
        \t//## File {f}, line 27
                /*0080*/                   STG.E [R8.64], RZ ;
                /*0090*/                   IADD3 R10, R10, -0x1, RZ ;
                /*00a0*/               @P2 BRA `(.L_x_3) ;
                /*00b0*/              @!P3 BRA `(.L_x_5) ;
        .L_x_4:
        \t//## File {f}, line 27
                /*00c0*/                   STG.E [R8.64], RZ ;
                /*00d0*/               @P4 BRA `(.L_x_4) ;
        .L_x_5:
        \t//## File {f}, line 27
                /*00e0*/               @P5 BRA `(.L_x_2) ;
        .L_x_9:
        \t//## File {f}, line 21
                /*00f0*/               @P6 BRA `(.L_x_0) ;
                /*0100*/                   EXIT ;
        .L_x_10:
                /*0110*/                   BRA `(.L_x_10);
        """)


def test_parse_sass_keeps_every_frame_of_inlined_line_info():
    text = textwrap.dedent("""\
        .text.kern:
        \t//## File "m.py", line 8 inlined at "m.py", line 14
        \t//## File "m.py", line 14 inlined at "m.py", line 27
        \t//## File "m.py", line 27
                /*0000*/                   IADD3 R1, R1, 0x1, RZ ;
                /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
        \t//## File "m.py", line 28
                /*0020*/                   EXIT ;
        """)
    instrs, _ = gm.parse_sass(text)
    assert [i.chain for i in instrs] == [(("m.py", 8), ("m.py", 14), ("m.py", 27))] * 2 + [(("m.py", 28),)]
    assert (instrs[0].file, instrs[0].line) == ("m.py", 27)  # the kernel's frame, as before


def test_loops_of_nested_helpers(tmp_path):
    """A SASS loop inside the one matched to a helper's loop is the loop of the helper it calls, its
    trips taken from the constexpr the calls pass; a loop behind a branch in its loop is charged never."""
    src = tmp_path / "nested_module.py"
    src.write_text(NESTED_SRC)
    ks = gm.analyse_sass(_nested_sass(src), str(src), "kern", dict(ROWS=16, CHUNK=4, BK=64, D=256), warps=4)
    r = ks.regions
    rows = next(v for k, v in r.items() if k.startswith("event:26 / for r in"))
    assert rows.trips == 4 and rows.loops == 1
    bits = [v for k, v in r.items() if k.startswith("event:26 / for bit in")]
    assert sorted(v.trips for v in bits) == [0, 4 * 5] and {v.loops for v in bits} == {2}
    assert any("behind a branch" in v.name for v in bits if v.trips == 0)


SMALL_KERNEL = """\
import triton
import triton.language as tl


@triton.jit
def row_sum(x_ptr, out_ptr, K, BLOCK: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK], tl.float32)
    for j0 in range(0, K, BLOCK):
        js = j0 + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + n * K + js, mask=js < K, other=0.0)
    tl.store(out_ptr + n, tl.sum(acc))
"""

SMALL_DRIVER = """\
import json, sys
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[2])
import gpu_model as gm
import small_kernel
from ssae_kernels.triton.aot_report import Spec
gm.CACHE = gm.Path(sys.argv[3])
spec = Spec("small.row_sum", small_kernel.row_sum, "BLOCK=128", dict(x_ptr="*fp32", out_ptr="*fp32", K="i32"),
            dict(BLOCK=128), 4)
ks = gm.kernel_sass(spec, dict(K=1024))
print(json.dumps(ks.to_json()))
"""


def test_analyse_real_cubin(tmp_path):
    """A small Triton kernel compiled for sm_90 (in a subprocess: conftest turns the interpreter on
    here) and disassembled: its loop is found, with K / BLOCK trips."""
    import subprocess

    pytest.importorskip("triton")
    if not os.path.exists(gm._tool("nvdisasm")):
        pytest.skip("no nvdisasm in the Triton package")
    (tmp_path / "small_kernel.py").write_text(SMALL_KERNEL)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")
    out = subprocess.run([sys.executable, "-c", SMALL_DRIVER, str(ROOT / "benchmarks"), str(tmp_path),
                          str(tmp_path / "cache")], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    ks = json.loads(out.stdout.strip().splitlines()[-1])
    loops = [r for r in ks["regions"] if "for j0" in r["name"]]
    assert loops and loops[0]["trips"] == 8
    assert loops[0]["groups"].get("memory", 0) >= 1 and loops[0]["groups"].get("fp32", 0) >= 1
    assert ks["registers"] > 0 and ks["occupancy"]["ctas"] >= 1


# ---- the selection replay ---------------------------------------------------------------------


def test_packed_keys_order():
    scores = np.array([[1.0, 2.0, 2.0, -0.0, 0.0, np.nan, -np.inf]], dtype=np.float32)
    keys = gm.packed_keys(scores, np.arange(7))[0]
    order = list(np.argsort(-keys, kind="stable"))
    assert order == [5, 1, 2, 0, 3, 4, 6]  # NaN first, ties and -0/+0 to the lower index


@pytest.mark.parametrize("seed", range(6))
def test_replay_matches_plain_loops(seed):
    rng = np.random.default_rng(seed)
    S, R, L, BM = 3, 5, 45, 8
    k = int(rng.integers(1, 6))
    cap = 1 << math.ceil(math.log2(k + BM + BM // 2))  # as topk_encode.buffer_capacity
    tiles = math.ceil(L / BM)
    scores = rng.standard_normal((S, R, L)).astype(np.float32)
    if seed % 2:  # ties and a hot latent
        scores = np.round(scores, 1)
        scores[:, :, 7] += 3
    keys = np.stack([gm.packed_keys(scores[s], np.arange(s * L, (s + 1) * L)) for s in range(S)])
    rep = gm.SelectionReplay(1, S, R, BM, k, cap)
    for t in range(tiles):
        tile = np.full((1, S, R, BM), gm.MIN_KEY, dtype=np.int64)
        chunk = keys[:, :, t * BM:(t + 1) * BM]
        tile[0, :, :, :chunk.shape[2]] = chunk
        rep.step(tile)
    st = rep.finish()
    passes, compactions, bufs = gm.brute_force_passes(keys.tolist(), k, cap, BM)
    assert st.passes == passes and st.compactions == compactions
    # the split buffers hold each split's k best, and their merge is the row's exact top k
    for s in range(S):
        for r in range(R):
            assert sorted(rep.buf[0, s, r][rep.buf[0, s, r] != gm.MIN_KEY].tolist(), reverse=True) == bufs[s][r]
    exact = -np.sort(-keys.transpose(1, 0, 2).reshape(R, S * L), axis=1)[:, :k]
    assert (rep.results()[0] == exact).all()


def test_replay_overflow_is_caught():
    rep = gm.SelectionReplay(1, 1, 1, 4, 2, 4)  # capacity 4 < k + a tile: the trigger cannot protect it
    rep.step(np.arange(4, dtype=np.int64).reshape(1, 1, 1, 4))
    with pytest.raises(AssertionError, match="overflow"):
        rep.step(np.arange(10, 14, dtype=np.int64).reshape(1, 1, 1, 4))


# ---- the written results ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def results():
    if not RESULTS.exists():
        pytest.fail("benchmarks/results/gpu_model.json is missing: run python benchmarks/gpu_model.py")
    return json.loads(RESULTS.read_text())


def test_results_schema(results):
    for key in ("goal", "assumptions", "rows", "kernels", "replay", "activations", "sass_classes"):
        assert key in results
    grid = {(r["d"], r["M"], r["k"], r["kernel"]) for r in results["rows"]}
    for d in (576, 2304, 4096):
        for M in (65536, 1048576):
            for k in (32, 128):
                for kernel in ("triton_encode", "cuda_encode"):
                    assert (d, M, k, kernel) in grid
    for r in results["rows"]:
        assert r["N"] == 4096
        assert 0 < r["predicted_fraction_of_peak"] <= 1
        assert isinstance(r["breakdown"], dict)
    for name, a in results["assumptions"].items():
        assert {"value", "unit", "kind", "source"} <= set(a), name
        assert a["source"], name


def test_goal_row(results):
    g = results["goal"]
    row = [r for r in results["rows"] if r["kernel"] == "triton_encode" and r["d"] == 2304 and r["M"] == 65536
           and r["k"] == 32 and r["N"] == 4096]
    assert len(row) == 1
    assert g["predicted"] == row[0]["predicted_fraction_of_peak"]
    assert g["met"] == (row[0]["predicted_fraction_of_peak"] >= 0.70)


def test_markdown_written(results):
    md = RESULTS.with_suffix(".md").read_text()
    assert "predictions, not measurements" in md and "## Assumptions" in md
