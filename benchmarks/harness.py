"""The shared benchmark harness: timing, thread count, peak memory, result records.

Every ``bench_*.py`` script uses these pieces:

- ``set_threads(n)``: fix the intra-op thread count (torch and OpenMP) and return it, for printing.
- ``time_fn`` / ``time_interleaved``: warm-up runs, then >= 5 timed runs; ``median`` of the samples.
  ``time_interleaved`` runs several callables round by round, so a change of machine load hits all of
  them alike and ratios between them stay meaningful on a shared machine.
- ``PeakRSS``: peak resident memory of a code region above the resident memory at its start
  (Linux: ``/proc/self/clear_refs`` resets VmHWM). Only sound in a fresh process started by
  ``run_isolated`` (see there), after one warm-up run of the measured code.
- ``run_isolated(target, kwargs)``: call ``module:function`` from benchmarks/ in a fresh Python
  process with a fixed thread count and ``MALLOC_MMAP_THRESHOLD_`` set; return its JSON result.
- ``make_record`` / ``append_records``: the result format shared by all benchmarks, appended to a
  JSON file (a list of records) that the plotting script reads.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
MIN_REPEATS = 5  # docs/benchmarks.md: medians of at least 5 runs

# glibc returns freed heap memory to the OS only from the top of the heap, and raises its mmap threshold
# (up to 32 MB) each time an mmapped block is freed, so a freed 1-32 MB block can stay resident and be
# reused unseen by VmHWM. With a fixed 64 KiB threshold every large block is mmapped and unmapped on free:
# VmRSS drops after frees and every new large allocation shows up in VmHWM.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}

_RESULT_TAG = "@@harness-result@@ "


# ---------------------------------------------------------------------------------------------- threads


def set_threads(n: int) -> int:
    """Fix torch's intra-op threads (and OpenMP's, which our C++ kernels use) to ``n``; return the count."""
    import torch

    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    return torch.get_num_threads()


def thread_env(n: int) -> dict[str, str]:
    # For child processes: OpenMP runtimes read these at start, before torch.set_num_threads runs.
    return {"OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)}


# ---------------------------------------------------------------------------------------------- timing


def _sync(device) -> None:
    if device is not None and str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def time_fn(fn, *, warmup: int = 1, repeats: int = MIN_REPEATS, setup=None, device=None) -> list[float]:
    """Run ``fn()`` ``warmup`` times untimed, then ``repeats`` times timed; return the times in seconds.

    ``setup()``, if given, runs untimed before every call (e.g. to drop gradients).
    """
    return time_interleaved({"fn": fn}, warmup=warmup, repeats=repeats, setup=setup, device=device)["fn"]


def time_interleaved(
    fns: dict, *, warmup: int = 1, repeats: int = MIN_REPEATS, setup=None, device=None
) -> dict[str, list[float]]:
    """Time several callables round-robin: ``warmup`` untimed rounds, then ``repeats`` timed rounds.

    Returns name -> list of ``repeats`` times in seconds, round r of every list from the same round.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for rnd in range(warmup + repeats):
        for name, fn in fns.items():
            if setup is not None:
                setup()
            gc.collect()  # a collection inside a timed region would be charged to whoever triggered it
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            dt = time.perf_counter() - t0
            if rnd >= warmup:
                samples[name].append(dt)
    return samples


def median(samples) -> float:
    if len(samples) == 0:
        raise ValueError("no samples")
    return float(statistics.median(samples))


def paired_ratio(samples, floor_samples) -> float:
    """Median over rounds of samples[r] / floor_samples[r] (both from the same interleaved rounds)."""
    if len(samples) != len(floor_samples) or not samples:
        raise ValueError(f"need equally many samples, got {len(samples)} and {len(floor_samples)}")
    return median([a / b for a, b in zip(samples, floor_samples)])


# ---------------------------------------------------------------------------------------------- memory


def _status_kb(*fields: str) -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in fields:
                out[key] = int(value.split()[0]) * 1024  # the kernel reports kB
    missing = set(fields) - set(out)
    if missing:
        raise RuntimeError(f"/proc/self/status has no {sorted(missing)}")
    return out


def rss_bytes() -> int:
    return _status_kb("VmRSS")["VmRSS"]


def peak_rss_bytes() -> int:
    return _status_kb("VmHWM")["VmHWM"]


def reset_peak_rss() -> None:
    """Set VmHWM to the current VmRSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_measurement_problem() -> str | None:
    """None if peak-RSS measurement works in this process, else why not."""
    try:
        reset_peak_rss()
        _status_kb("VmRSS", "VmHWM")
    except OSError as e:
        return f"cannot reset peak RSS via /proc/self/clear_refs: {e}"
    except RuntimeError as e:
        return str(e)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        return "MALLOC_MMAP_THRESHOLD_ not set: freed blocks may stay resident (use run_isolated)"
    return None


class PeakRSS:
    """``with PeakRSS() as m: ...`` then ``m.baseline``, ``m.peak``, ``m.extra`` (bytes).

    extra = VmHWM at exit - VmRSS at entry: the memory the region touched on top of what was resident.
    """

    def __enter__(self):
        gc.collect()
        reset_peak_rss()
        self.baseline = rss_bytes()
        return self

    def __exit__(self, *exc):
        self.peak = peak_rss_bytes()
        self.extra = self.peak - self.baseline
        return False


def peak_call_bytes(fn, device) -> int:
    """The memory one call of ``fn`` takes at its peak above what was in use before it: allocated bytes on a
    GPU, resident bytes on the CPU (``PeakRSS``; exact for large buffers only with ``MALLOC_ENV``)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with PeakRSS() as m:
        fn()
    return m.extra


def probe_allocation(megabytes: float = 100.0, warm_megabytes: float = 0.0, chunk_megabytes: float = 0.0) -> dict:
    """Soundness check of PeakRSS (run it through ``run_isolated``).

    Allocates and frees ``warm_megabytes`` (at least 1 MB) first (must not count), then measures a region that fills
    ``megabytes`` of float32 tensors (one tensor, or chunks of ``chunk_megabytes``) and frees them
    again before the region ends (the peak must still see them). Returns the measured extra bytes
    and the bytes allocated.
    """
    import torch

    def fill(mb):
        n = int(mb * 1e6) // 4
        if chunk_megabytes <= 0:
            return [torch.ones(n)]
        c = int(chunk_megabytes * 1e6) // 4
        return [torch.ones(min(c, n - i)) for i in range(0, n, c)]

    # Always run the fill once outside the region: its first call pages in library code and lazily
    # initialised state (7 MB seen in CI), which a benchmark's warm-up would also keep out of the peak.
    del_me = fill(max(warm_megabytes, 1.0))
    del del_me
    with PeakRSS() as m:
        held = fill(megabytes)
        allocated = sum(t.numel() * t.element_size() for t in held)
        del held
    return {"extra_bytes": m.extra, "allocated_bytes": allocated, "baseline_bytes": m.baseline}


# ---------------------------------------------------------------------------------------------- isolation


class IsolatedRunError(RuntimeError):
    pass


def run_isolated(target: str, kwargs: dict | None = None, *, threads: int = 2, malloc_env: bool = True,
                 echo: bool = False, timeout: float | None = None):
    """Call ``target`` ("module:function", importable from benchmarks/) in a fresh Python process.

    The child gets ``threads`` intra-op threads (env and ``torch.set_num_threads``), and, with
    ``malloc_env``, ``MALLOC_ENV`` so that PeakRSS sees every large allocation. ``kwargs`` and the
    function's return value travel as JSON. Raises IsolatedRunError with the end of the child's stderr
    if it fails (including being killed, e.g. by the OOM killer).
    """
    env = dict(os.environ)
    env.update(thread_env(threads))
    if malloc_env:
        env.update(MALLOC_ENV)
    else:
        for key in MALLOC_ENV:
            env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH_DIR)] + [p for p in [env.get("PYTHONPATH")] if p])
    request = json.dumps({"target": target, "kwargs": kwargs or {}, "threads": threads})
    code = "import harness; harness._child_main()"
    proc = subprocess.run(
        [sys.executable, "-c", code], input=request, capture_output=True, text=True, env=env,
        cwd=str(REPO_DIR), timeout=timeout,
    )
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT_TAG):
            result = json.loads(line[len(_RESULT_TAG):])
        elif echo:
            print(line)
    if proc.returncode != 0 or result is None:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        raise IsolatedRunError(f"{target} failed ({how}):\n{tail}")
    return result


def _disable_transparent_huge_pages() -> None:
    # With THP "always" (some kernels' default) khugepaged may collapse half-used regions into 2 MB pages
    # mid-measurement, so VmHWM grows by more than the region touched. Best effort: Linux only.
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE
    except (OSError, AttributeError):
        pass


def _child_main() -> None:
    import importlib

    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None:
        _disable_transparent_huge_pages()
    request = json.loads(sys.stdin.read())
    set_threads(request["threads"])
    module_name, _, fn_name = request["target"].partition(":")
    fn = getattr(importlib.import_module(module_name), fn_name)
    result = fn(**request["kwargs"])
    sys.stdout.flush()
    print(_RESULT_TAG + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------- records


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO_DIR), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment(threads: int | None = None) -> dict:
    """Versions and machine facts stored with every record."""
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ssae-kernels": _version("ssae-kernels"),
        "eai-sparsify": _version("eai-sparsify"),
        "sae-lens": _version("sae-lens"),
        "git": _git_commit(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads if threads is not None else torch.get_num_threads(),
        # other work on the machine at the start: times (even ratios) are unreliable when it exceeds the cores
        "loadavg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


RECORD_KEYS = ("benchmark", "op", "provider", "shape", "dtype", "device", "versions", "threads", "status",
               "reason", "median_s", "samples_s", "peak_extra_bytes", "extra", "run_id", "timestamp")


def make_record(*, benchmark: str, op: str, provider: str, shape: dict, dtype, device, versions: dict,
                samples_s=None, peak_extra_bytes=None, status: str = "ok", reason: str | None = None,
                run_id: str | None = None, extra: dict | None = None) -> dict:
    """One result: status "ok", or "unavailable"/"skipped"/"error" with a reason (then times may be None)."""
    if status not in ("ok", "unavailable", "skipped", "error"):
        raise ValueError(f"status must be ok, unavailable, skipped or error, got {status!r}")
    if status != "ok" and not reason:
        raise ValueError(f"a {status!r} record needs a reason")
    samples = [float(s) for s in samples_s] if samples_s is not None else None
    return {
        "benchmark": benchmark,
        "op": op,
        "provider": provider,
        "shape": dict(shape),
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "versions": dict(versions),
        "threads": versions.get("threads"),
        "status": status,
        "reason": reason,
        "median_s": median(samples) if samples else None,
        "samples_s": samples,
        "peak_extra_bytes": None if peak_extra_bytes is None else int(peak_extra_bytes),
        "extra": dict(extra or {}),
        "run_id": run_id,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"


def load_records(path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list of records")
    return data


def append_records(path, records: list[dict]) -> None:
    """Append records to the JSON list in ``path`` (created if missing), replacing the file atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = load_records(path) + list(records)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, allow_nan=True)
        f.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp makes the file private; results are meant to be read
    os.replace(tmp, path)


def latest_run(records: list[dict], benchmark: str | None = None) -> list[dict]:
    """The records of the last run_id in the list (optionally of one benchmark)."""
    recs = [r for r in records if benchmark is None or r.get("benchmark") == benchmark]
    if not recs:
        return []
    last = recs[-1].get("run_id")
    return [r for r in recs if r.get("run_id") == last]


def mem_available_bytes() -> int | None:
    from ssae_kernels.memory import available_bytes

    return available_bytes("cpu")


def fmt_mb(nbytes) -> str:
    return "-" if nbytes is None or (isinstance(nbytes, float) and math.isnan(nbytes)) else f"{nbytes / 1e6:.1f}"
