"""Lint: pointer offsets in the Triton kernels are computed in int64 wherever they multiply.

Rule (INT64-OFFSET). In every ``@triton.jit`` function of ``ssae_kernels/triton/``, for each pointer
expression ``P + E`` (or ``E + P``, ``P - E``), where P is a pointer:

  every product ``A * B`` inside the offset E must have an int64 factor,
  unless both A and B are compile-time constants.

A row index times a row length (``rows * D``), a latent times a stride, a (row, split) state index
times a capacity: any of these overflows int32 once the tensor passes 2^31 elements (N * d at
N = 2^20, d = 2048), silently, on the GPU only. Sums without a product stay below 2^31 for every
supported shape (indices < 2^31 - 1 are checked by the launchers), so they are allowed.

Definitions (all syntactic, per function, in source order):

- pointer: a parameter whose aot_report type starts with ``*`` (or, for helpers, whose name ends in
  ``_ptr``, ``_in`` or ``_out`` or is a pointer parameter of a kernel of the module); a local bound to
  pointer arithmetic; a subscript of a pointer.
- int64: ``X.to(tl.int64)``; ``tl.full/zeros(..., tl.int64)``; a parameter of type ``i64``; ``tl.load``
  of a pointer whose parameter type is ``*i64``; ``tl.where(c, a, b)`` / ``tl.minimum`` /
  ``tl.maximum`` with an int64 branch; arithmetic, unary minus and subscripts of an int64 operand
  (C-style promotion); a local last bound to an int64 expression. Anything else is not int64.
- compile-time constant: a number, a ``tl.constexpr`` parameter, a module-level constant
  (UPPER_CASE name), or arithmetic of those.

``check_source`` returns the violations as (function, line, expression); the test fails on any, and
a planted bad kernel shows the lint catches ``x_ptr + rows * D``.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path


TRITON_DIR = Path(__file__).resolve().parent.parent / "ssae_kernels" / "triton"
ARITH = (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod, ast.LShift, ast.RShift, ast.BitAnd, ast.BitOr,
         ast.BitXor)


def _is_jit(fn: ast.FunctionDef) -> bool:
    for d in fn.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        if isinstance(target, ast.Attribute) and target.attr == "jit":
            return True
        if isinstance(target, ast.Name) and target.id == "jit":
            return True
    return False


def _is_int64_attr(node) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "int64"


class _Function:
    def __init__(self, fn: ast.FunctionDef, types: dict, module_consts: set, calls=None, helpers=()):
        self.fn = fn
        self.calls, self.helpers = calls if calls is not None else {}, set(helpers)
        self.types = types  # parameter -> aot_report type ("*i64", "i32", ...), where known
        self.consts = set(module_consts)
        self.ptrs, self.i64 = set(), set()
        for a in fn.args.args:
            ann = a.annotation
            if ann is not None and "constexpr" in ast.unparse(ann):
                self.consts.add(a.arg)
            t = types.get(a.arg, "")
            if t.startswith("*") or (not t and a.arg.endswith(("_ptr", "_in", "_out"))):
                self.ptrs.add(a.arg)
            if t == "i64":
                self.i64.add(a.arg)
        self.violations = []

    # -- classification
    def is_const(self, e) -> bool:
        if isinstance(e, ast.Constant):
            return isinstance(e.value, (int, float, bool))
        if isinstance(e, ast.Name):
            return e.id in self.consts
        if isinstance(e, ast.BinOp):
            return self.is_const(e.left) and self.is_const(e.right)
        if isinstance(e, ast.UnaryOp):
            return self.is_const(e.operand)
        return False

    def is_ptr(self, e) -> bool:
        if isinstance(e, ast.Name):
            return e.id in self.ptrs
        if isinstance(e, ast.Subscript):
            return self.is_ptr(e.value)
        if isinstance(e, ast.BinOp) and isinstance(e.op, (ast.Add, ast.Sub)):
            return self.is_ptr(e.left) or self.is_ptr(e.right)
        return False

    def _ptr_base(self, e):
        while True:
            if isinstance(e, ast.Name):
                return e.id
            if isinstance(e, ast.Subscript):
                e = e.value
            elif isinstance(e, ast.BinOp):
                e = e.left if self.is_ptr(e.left) else e.right
            else:
                return None

    def is_i64(self, e) -> bool:
        if isinstance(e, ast.Name):
            return e.id in self.i64
        if isinstance(e, ast.Subscript):
            return self.is_i64(e.value)
        if isinstance(e, ast.UnaryOp):
            return self.is_i64(e.operand)
        if isinstance(e, ast.BinOp) and isinstance(e.op, ARITH):
            return self.is_i64(e.left) or self.is_i64(e.right)
        if isinstance(e, ast.Call):
            f = e.func
            if isinstance(f, ast.Attribute) and f.attr == "to":
                return bool(e.args) and _is_int64_attr(e.args[0])
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in ("full", "zeros"):
                return any(_is_int64_attr(a) for a in e.args[1:]) or any(_is_int64_attr(k.value) for k in e.keywords)
            if name == "load" and e.args:
                base = self._ptr_base(e.args[0])
                return self.types.get(base, "") == "*i64"
            if name == "where" and len(e.args) == 3:
                return self.is_i64(e.args[1]) or self.is_i64(e.args[2])
            if name in ("minimum", "maximum"):
                return any(self.is_i64(a) for a in e.args)
        return False

    # -- the walk
    def run(self):
        for stmt in self.fn.body:
            self._stmt(stmt)
        return self.violations

    def _stmt(self, stmt):
        if isinstance(stmt, ast.For):
            self._record_calls(stmt.iter)
        elif isinstance(stmt, (ast.While, ast.If)):
            self._record_calls(stmt.test)
        else:
            self._record_calls(stmt)
        for node in ast.walk(stmt) if not isinstance(stmt, (ast.For, ast.While, ast.If)) else [stmt]:
            if isinstance(node, ast.BinOp):
                self._check(node)
        if isinstance(stmt, (ast.For, ast.While, ast.If)):
            for e in ([stmt.iter] if isinstance(stmt, ast.For) else [stmt.test]):
                for node in ast.walk(e):
                    if isinstance(node, ast.BinOp):
                        self._check(node)
            for s in stmt.body + stmt.orelse:
                self._stmt(s)
            return
        if isinstance(stmt, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            value = stmt.value
            for t in targets:
                if isinstance(t, ast.Name):
                    if isinstance(stmt, ast.AugAssign):
                        ptr, i64 = t.id in self.ptrs, t.id in self.i64 or self.is_i64(value)
                    else:
                        ptr, i64 = self.is_ptr(value), self.is_i64(value)
                    (self.ptrs.add if ptr else self.ptrs.discard)(t.id)
                    (self.i64.add if i64 else self.i64.discard)(t.id)
                elif isinstance(t, ast.Tuple):
                    for el in t.elts:
                        if isinstance(el, ast.Name):
                            self.ptrs.discard(el.id)
                            self.i64.discard(el.id)

    def _record_calls(self, expr):
        """For each call to a jit helper: per argument, its type as seen here ('*i64', '*', 'i64' or '')."""
        for node in ast.walk(expr):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in self.helpers:
                args = []
                for a in node.args:
                    if isinstance(a, ast.Name) and self.types.get(a.id, "").startswith("*"):
                        args.append(self.types[a.id])
                    elif self.is_ptr(a):
                        args.append("*")
                    elif self.is_i64(a):
                        args.append("i64")
                    else:
                        args.append("")
                self.calls.setdefault(node.func.id, []).append(args)

    def _check(self, node: ast.BinOp):
        if not isinstance(node.op, (ast.Add, ast.Sub)):
            return
        for ptr, off in ((node.left, node.right), (node.right, node.left)):
            if self.is_ptr(ptr) and not self.is_ptr(off):
                for m in ast.walk(off):
                    if isinstance(m, ast.BinOp) and isinstance(m.op, ast.Mult):
                        if self.is_const(m.left) and self.is_const(m.right):
                            continue
                        if not (self.is_i64(m.left) or self.is_i64(m.right)):
                            self.violations.append((self.fn.name, m.lineno, ast.unparse(m)))


def spec_types() -> dict:
    """module file name -> {parameter: type} from aot_report's specs (pointer element types)."""
    from ssae_kernels.triton import aot_report

    out = {}
    for spec in aot_report.all_specs():
        fn = spec.fn.fn if hasattr(spec.fn, "fn") else spec.fn
        out.setdefault(os.path.basename(fn.__code__.co_filename), {}).update(spec.types)
    return out


def check_sources(sources: dict, types_by_file: dict | None = None) -> list[tuple[str, str, int, str]]:
    """Violations of INT64-OFFSET over modules {file name: source}: (file, function, line, product).
    Helpers (jit functions without aot_report types) take pointer / int64 parameters from their call
    sites in these modules: a parameter is int64 (a pointer) when every call passes one."""
    types_by_file = types_by_file or {}
    parsed = {}
    for name, src in sources.items():
        tree = ast.parse(src)
        consts = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                  if isinstance(t, ast.Name) and t.id.isupper()}
        parsed[name] = (tree, consts, [f for f in tree.body if isinstance(f, ast.FunctionDef) and _is_jit(f)])
    helpers = {f.name for _, _, fns in parsed.values() for f in fns}
    param_types: dict = {}  # helper -> {param: type}
    out = []
    for _ in range(4):  # helpers of helpers: a few rounds to a fixed point
        calls, out = {}, []
        for name, (tree, consts, fns) in parsed.items():
            file_types = types_by_file.get(name, {})
            for fn in fns:
                params = [a.arg for a in fn.args.args]
                own = {p: file_types[p] for p in params if p in file_types}
                own.update(param_types.get(fn.name, {}))
                out += [(name, *v) for v in _Function(fn, own, consts, calls, helpers).run()]
        new = {}
        for helper, sites in calls.items():
            fn = next(f for _, _, fns in parsed.values() for f in fns if f.name == helper)
            t = {}
            for i, p in enumerate(a.arg for a in fn.args.args):
                seen = {site[i] for site in sites if i < len(site)}
                if len(seen) == 1 and "" not in seen:
                    t[p] = seen.pop()
                elif seen and all(x.startswith("*") for x in seen):
                    t[p] = "*"
            new[helper] = t
        if new == param_types:
            break
        param_types = new
    return sorted(set(out), key=lambda v: (v[0], v[2], v[3]))


def check_source(source: str, types: dict | None = None) -> list[tuple[str, int, str]]:
    """Violations of INT64-OFFSET in one module's source: (function, line, product)."""
    return [v[1:] for v in check_sources({"m.py": source}, {"m.py": types or {}})]


BAD = '''
import triton
import triton.language as tl

@triton.jit
def bad_kernel(x_ptr, idx_ptr, out_ptr, N, D, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    a = tl.load(x_ptr + rows[:, None] * D + tl.arange(0, 16)[None, :])      # flagged: int32 rows * D
    good = tl.load(x_ptr + rows.to(tl.int64)[:, None] * D)                   # fine
    idx = tl.load(idx_ptr + rows)                                            # int64 entries: fine to multiply
    w = tl.load(x_ptr + idx * D)                                             # fine
    base = out_ptr + rows * D                                                # flagged: a pointer local
    tl.store(base + BLOCK * 4, a)                                            # constants only: fine
    r64 = rows.to(tl.int64)
    tl.store(out_ptr + (r64 * 3 + 1) * D, a)                                 # fine: promoted
'''


def test_lint_catches_planted_violations():
    found = check_source(BAD, {"x_ptr": "*bf16", "idx_ptr": "*i64", "out_ptr": "*bf16", "N": "i32", "D": "i32"})
    assert [(f, expr) for f, _, expr in found] == [("bad_kernel", "rows[:, None] * D"), ("bad_kernel", "rows * D")]


def test_lint_rule_details():
    src = '''
import triton
import triton.language as tl
CAP = 8

@triton.jit
def k(buf_ptr, count_ptr, n_ptr, N, s, KP: tl.constexpr):
    rows = tl.arange(0, 16)
    state = rows.to(tl.int64) * N + s
    tl.store(buf_ptr + state[:, None] * KP + tl.arange(0, KP)[None, :], 0)   # int64 state: fine
    t = tl.where(rows < N, state, 0)
    tl.store(buf_ptr + t * KP, 0)                                             # where of an int64: fine
    state = rows * N                                                          # rebound to int32
    tl.store(buf_ptr + state * CAP, 0)                                        # flagged
    n = tl.load(n_ptr + rows)                                                 # *i32: int32
    tl.store(count_ptr + n * KP, 0)                                           # flagged
'''
    found = check_source(src, {"buf_ptr": "*i64", "count_ptr": "*i32", "n_ptr": "*i32"})
    assert [expr for _, _, expr in found] == ["state * CAP", "n * KP"]


# Products the rule flags that cannot overflow, each with the bound that says so. Not row or latent
# indices: radix-bin tables of shape [256, blocks], blocks = cdiv(P, 1024), P = N * k < 2^31.
ALLOWED = {
    ("sparse_backward.py", "bins * num_blocks"): "256 * cdiv(P, 1024) <= P / 4 + 256 < 2^31",
    ("sparse_backward.py", "sorted_digit * num_blocks"): "digit < 256: as above",
}


def test_triton_kernels_use_int64_offsets():
    sources = {p.name: p.read_text() for p in sorted(TRITON_DIR.glob("*.py"))}
    violations = [v for v in check_sources(sources, spec_types()) if (v[0], v[3]) not in ALLOWED]
    assert not violations, ("pointer offsets with an int32 product (rule INT64-OFFSET, see this file's "
                            "docstring): " + "; ".join(f"{f}:{fn}:{line} `{e}`" for f, fn, line, e in violations))


def test_allowed_products_still_exist():
    """Keep ALLOWED honest: an entry whose product left the code goes."""
    sources = {p.name: p.read_text() for p in sorted(TRITON_DIR.glob("*.py"))}
    found = {(v[0], v[3]) for v in check_sources(sources, spec_types())}
    assert set(ALLOWED) <= found
