"""`make gpu-check`: everything that needs a GPU, in one command of at most 8 minutes on one H100/H200.

    python3 benchmarks/gpu_check.py [--budget 470] [--logs DIR] [--results DIR] [--skip STAGE ...]

Stages, each with its wall time and a share of the budget:
  env    the python3 it runs under must hold a CUDA torch that sees the GPU (no venv, nothing downloaded)
  peers  wheels in .whl/ (benchmarks/gpu_check_wheels.sh: eai-sparsify and what it imports), if any,
         installed into a temporary folder put on PYTHONPATH
  build  ssae_kernels._C built in place with its CUDA backend (SSAE_BUILD_CUDA=1) for this GPU's
         architecture only (TORCH_CUDA_ARCH_LIST, default the GPU's, e.g. 9.0), then checked to hold it
  tests  every GPU test of tests/ops (the triton and cuda cases, test_gpu_*) with TRITON_INTERPRET=0,
         so Triton runs compiled on CUDA tensors; a GPU test skipped for want of a GPU, the CUDA build
         or Triton fails the check, other skips are listed
  bench  benchmarks/bench_gpu.py: ops, training step and optimizer at the ref and large shapes, then the encode
         grid against the GEMM floor, torch.topk(mm), sparsify and the predictions of gpu_model.json

Where $OUT is set (the device tool's output folder) logs go to $OUT and results to $OUT/gpu, else to
build/gpu-check and benchmarks/results/gpu. Results: bench_gpu.json, bench_gpu.md (bench_gpu.py) and
gpu_check.md (stages, test counts, skip reasons). Exit status 0 only if every stage passed.

Without a GPU it prints one line and exits 0: the check is `nvidia-smi`, before anything heavy is
imported or built (this file imports only the standard library).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("env", "peers", "build", "tests", "bench")
PYTHON = sys.executable  # the machine's python3 and its CUDA torch: no venv
# A skipped GPU test with one of these reasons did not run for want of the environment the check
# provides (a GPU, the CUDA build, compiled Triton): that fails the check rather than passing quietly.
ENVIRONMENT_SKIPS = ("needs a CUDA GPU", "built without", "_C is not available", "cannot import triton",
                     "compiled-mode test", "could not import")
TESTS = ["tests/ops", "-k", "triton or cuda or gpu"]  # every case on CUDA tensors carries one of these
BENCH = ["benchmarks/bench_gpu.py", "--shape", "ref", "large", "--grid", "--repeats", "10"]
BENCH_RESERVE = 150  # seconds kept for the bench when the tests run long


def detect_gpus() -> tuple[list[str], str]:
    """The GPUs `nvidia-smi -L` lists, and why none if it lists none."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return [], "nvidia-smi not found"
    try:
        result = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return [], f"nvidia-smi failed ({type(error).__name__})"
    gpus = [line.strip() for line in result.stdout.splitlines() if line.startswith("GPU ")]
    if result.returncode != 0 or not gpus:
        said = (result.stdout + result.stderr).strip().splitlines()
        return [], f"nvidia-smi lists no GPU (exit {result.returncode}{': ' + said[0][:100] if said else ''})"
    return gpus, ""


class Check:
    """The stages run so far, their output and the time left."""

    def __init__(self, budget: float, logs: Path):
        self.start = time.monotonic()
        self.budget = budget
        self.logs = logs
        self.stages: list[dict] = []
        self.env = dict(os.environ, PYTHONUNBUFFERED="1",
                        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        self.log = open(logs / "gpu_check.log", "w")

    def say(self, text: str = "") -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def run(self, name: str, commands: list[list[str]], limit: float, log_name: str | None = None,
            echo: bool = False, env: dict | None = None) -> dict:
        """Runs ``commands`` in turn (stopping at the first failure) within ``limit`` seconds; output to
        logs/<log_name> (or this check's own log) and, with ``echo``, to stdout as it comes."""
        limit = max(1.0, limit)
        self.say(f"\n== {name} (limit {limit:.0f} s)")
        started = time.monotonic()
        out = open(self.logs / log_name, "w") if log_name else self.log
        status = "ok"
        for cmd in commands:
            self.say("$ " + (" ".join(cmd) if "-c" not in cmd else f"{cmd[0]} -c <{name} check>"))
            out.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)
            copier = threading.Thread(target=self._copy, args=(proc.stdout, out, echo or not log_name))
            copier.start()
            try:
                code = proc.wait(timeout=max(1.0, limit - (time.monotonic() - started)))
            except subprocess.TimeoutExpired:
                # SIGINT first: pytest then prints its summary and bench_gpu keeps what it saved
                _signal_group(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    pass
                code, status = None, f"timed out after {limit:.0f} s"
            copier.join(timeout=0 if code is None else 30)
            if copier.is_alive() or code is None:  # what is left of the group would hold the pipe open
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
                copier.join()
            out.flush()
            if code is not None and code != 0:
                status = f"failed (exit {code})"
            if status != "ok":
                break
        if log_name:
            out.close()
        stage = dict(name=name, status=status, seconds=time.monotonic() - started, log=log_name, detail="")
        self.stages.append(stage)
        self.say(f"== {name}: {status} in {stage['seconds']:.1f} s")
        return stage

    def _copy(self, stream, out, echo: bool) -> None:
        for line in stream:
            out.write(line)
            if echo:
                print(line, end="", flush=True)
                if out is not self.log:
                    self.log.write(line)

    def tail(self, log_name: str, lines: int, start_at: str | None = None) -> None:
        """Prints the last ``lines`` lines of a stage log (from the last line containing ``start_at``)."""
        text = (self.logs / log_name).read_text(errors="replace").splitlines()
        if start_at:
            found = [i for i, line in enumerate(text) if start_at in line]
            if found:
                text = text[found[-1]:]
        for line in text[-lines:]:
            self.say("   | " + line)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:  # already gone
        pass


def python_snippet(code: str) -> list[str]:
    return [PYTHON, "-c", code]


ENV_PROBE = """
import json, subprocess, torch
info = dict(torch=torch.__version__, cuda=torch.version.cuda, available=torch.cuda.is_available())
if info["available"]:
    p = torch.cuda.get_device_properties(0)
    info.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                sms=p.multi_processor_count)
try:
    import triton; info["triton"] = triton.__version__
except Exception as error:
    info["triton"] = f"missing ({error})"
try:
    info["nvcc"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
except Exception as error:
    info["nvcc"] = f"missing ({error})"
print("ENV " + json.dumps(info))
if not info["available"]:
    raise SystemExit(f"a GPU is present but torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use it")
"""

BUILD_CHECK = """
from ssae_kernels import backends
C = backends.BACKENDS["cuda"].extension
assert C is not None, backends.BACKENDS["cpu"].load_error
info = C.build_info()
assert info.get("cuda"), f"_C was built without its CUDA kernels: {info}"
print("ssae_kernels._C holds the CUDA backend:", info)
try:  # what is built and which backend serves what: for the log, never fatal
    from ssae_kernels import info as report
    print(report.report())
except Exception as error:
    print("python -m ssae_kernels.info failed:", repr(error))
"""


def junit_summary(path: Path) -> dict:
    """Counts, failed test ids and skip reasons (with counts) of a pytest --junitxml file."""
    counts = collections.Counter()
    failed, skips = [], collections.Counter()
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        counts[outcome] += 1
        if outcome in ("failure", "error"):
            failed.append(name)
        elif outcome == "skipped":
            reason = next(child for child in case if child.tag == "skipped").get("message", "")
            skips[reason.removeprefix("Skipped: ")[:200]] += 1
    environment = {reason: n for reason, n in skips.items() if any(s in reason for s in ENVIRONMENT_SKIPS)}
    return dict(passed=counts["passed"], failed=counts["failure"] + counts["error"], skipped=counts["skipped"],
                failed_tests=failed, skips=dict(skips.most_common()), environment_skips=environment)


def check_markdown(gpu: str, probe: dict, stages: list[dict], tests: dict | None, budget: float) -> str:
    lines = [f"# gpu-check: {gpu}", "",
             f"`python3 benchmarks/gpu_check.py` (`make gpu-check`) on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
             + ", ".join(f"{key} {value}" for key, value in probe.items()), "",
             "| stage | status | seconds | detail |", "|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {s['detail']} |" for s in stages]
    lines.append(f"| total | | {sum(s['seconds'] for s in stages):.1f} | budget {budget:.0f} s |")
    if tests:
        lines += ["", f"GPU tests (tests/ops, `-k \"{TESTS[2]}\"`, TRITON_INTERPRET=0): {tests['passed']} passed, "
                      f"{tests['failed']} failed, {tests['skipped']} skipped."]
        if tests["failed_tests"]:
            lines += ["", "Failed:", ""] + [f"- `{name}`" for name in tests["failed_tests"]]
        if tests["skips"]:
            lines += ["", "| skipped | reason |", "|---|---|"]
            lines += [f"| {n} | {reason.replace('|', '/')}{' (**environment**)' if reason in tests['environment_skips'] else ''} |"
                      for reason, n in tests["skips"].items()]
    return "\n".join(lines) + "\n"


def default_dirs() -> tuple[Path, Path]:
    out = os.environ.get("OUT")
    if out:  # the device tool brings back what is under $OUT (two folders deep at most)
        return Path(out), Path(out) / "gpu"
    return ROOT / "build" / "gpu-check", ROOT / "benchmarks" / "results" / "gpu"


def parse_args(argv=None):
    logs, results = default_dirs()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=470.0,
                    help="seconds for the whole check, build included (default 470: under 8 minutes)")
    ap.add_argument("--logs", type=Path, default=logs, help=f"log folder (default: $OUT, else {logs})")
    ap.add_argument("--results", type=Path, default=results,
                    help="folder of bench_gpu.json, bench_gpu.md, gpu_check.md (default: $OUT/gpu, else "
                         "benchmarks/results/gpu)")
    ap.add_argument("--skip", nargs="+", default=[], choices=STAGES[1:], help="stages to leave out")
    args = ap.parse_args(argv)
    if args.budget < 60:
        ap.error("--budget must be at least 60 seconds")
    return args


def has_module(name: str) -> bool:
    return subprocess.run([PYTHON, "-c", f"import {name}"], capture_output=True).returncode == 0


def stage_peers(check: Check, wheels: list[Path]) -> None:
    site = Path(tempfile.mkdtemp(prefix="ssae-site-"))
    peers = check.run("peers", [[PYTHON, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                                 "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)]], 90)
    peers["detail"] = f"{len(wheels)} wheels"
    if peers["status"] == "ok":  # only packages the image lacks (gpu_check_wheels.sh), so nothing is shadowed
        check.env["PYTHONPATH"] += os.pathsep + str(site)


def stage_build(check: Check, probe: dict) -> bool:
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or probe.get("capability", "9.0")
    env = dict(check.env, SSAE_BUILD_CUDA="1", TORCH_CUDA_ARCH_LIST=arch,
               MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 4)))
    build = check.run("build", [[PYTHON, "setup.py", "-q", "build_ext", "--inplace"], python_snippet(BUILD_CHECK)],
                      min(300, check.left() - 240), "build.log", env=env)
    build["detail"] = f"TORCH_CUDA_ARCH_LIST={arch}"
    check.tail("build.log", 40 if build["status"] != "ok" else 4)
    return build["status"] == "ok"


def stage_tests(check: Check) -> dict | None:
    junit = Path(tempfile.mkdtemp(prefix="ssae-junit-")) / "tests.xml"
    extra = []
    if has_module("xdist"):
        extra += ["-n", str(min(8, os.cpu_count() or 1))]  # Triton compiles in parallel
    if has_module("pytest_timeout"):
        extra += ["--timeout", "120"]  # a kernel that hangs costs one test, not the stage
    run = check.run("tests", [[PYTHON, "-m", "pytest", *TESTS, "-q", "-p", "no:cacheprovider", "-rfEs",
                               "--durations=10", f"--junitxml={junit}", *extra]],
                    check.left() - BENCH_RESERVE, "tests.log", env=dict(check.env, TRITON_INTERPRET="0"))
    check.tail("tests.log", 40, start_at="short test summary info")
    if not junit.exists():
        run["status"] = run["status"] if run["status"] != "ok" else "failed (no test report)"
        return None
    tests = junit_summary(junit)
    run["detail"] = (f"{tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped "
                     f"({sum(tests['environment_skips'].values())} for want of GPU/build/Triton)")
    for reason, n in tests["environment_skips"].items():
        check.say(f"   {n} GPU tests skipped: {reason}")
    if tests["environment_skips"] and run["status"] == "ok":
        run["status"] = "failed (GPU tests skipped)"
    return tests


def main(argv=None) -> int:
    args = parse_args(argv)
    gpus, why = detect_gpus()
    if not gpus:
        print(f"gpu-check: no GPU here ({why}); nothing built or run. Run it on the GPU machine (docs/benchmarks.md).")
        return 0

    args.logs.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    check = Check(args.budget, args.logs)
    check.say(f"gpu-check: {'; '.join(gpus)}; python {PYTHON}; budget {args.budget:.0f} s; "
              f"logs {args.logs}, results {args.results}")

    env = check.run("env", [python_snippet(ENV_PROBE)], 90)
    probe = next((json.loads(line[4:]) for line in (args.logs / "gpu_check.log").read_text().splitlines()
                  if line.startswith("ENV ")), {})
    tests = None
    if env["status"] == "ok":
        wheels = sorted((ROOT / ".whl").glob("*.whl"))
        if wheels and "peers" not in args.skip:
            stage_peers(check, wheels)
        # without the extension neither the tests nor the bench would mean much
        built = "build" in args.skip or stage_build(check, probe)
        if built and "tests" not in args.skip:
            tests = stage_tests(check)
        if built and "bench" not in args.skip:
            bench = check.run("bench", [[PYTHON, *BENCH, "--out", str(args.results)]], check.left() - 5,
                              "bench.log", echo=True)
            bench["detail"] = f"results in {args.results}"

    (args.results / "gpu_check.md").write_text(check_markdown("; ".join(gpus), probe, check.stages, tests, args.budget))
    check.say("\n== gpu-check summary: " + "; ".join(gpus))
    for s in check.stages:
        check.say(f"{s['name']:<6} {s['status']:<28} {s['seconds']:>7.1f} s  {s['detail']}")
    check.say(f"{'total':<6} {'':<28} {time.monotonic() - check.start:>7.1f} s  (budget {args.budget:.0f} s)")
    check.say(f"results: {args.results} (bench_gpu.json, bench_gpu.md, gpu_check.md); logs: {args.logs}")
    return 0 if all(s["status"] == "ok" for s in check.stages) else 1


if __name__ == "__main__":
    sys.exit(main())
