"""The texts of the recipe: the built-in offline corpus, seeds and evaluation text, and readers for
user-given ones.

The built-in general corpus is Python's documentation (``pydoc_data.topics``) plus the docstrings of
the standard library; the subdomain is **asyncio** (event loops, coroutines, tasks and futures,
streams, transports, synchronization primitives), about 2% of that corpus. A few asyncio modules
(``HELD_OUT_MODULES``) are held out of the corpus entirely and are the evaluation text.
"""

from __future__ import annotations

import ast
import functools
import os
import sysconfig

from ... import text

BUILTIN_CORPUS = "builtin:python-docs+docstrings"
BUILTIN_SEEDS = "builtin:asyncio-seeds"
BUILTIN_EVAL = "builtin:asyncio-heldout"

# Written for this recipe: a handful of descriptions of the subdomain, used only as retrieval queries.
ASYNCIO_SEEDS = [
    "Coroutines are declared with async def and suspended with await. Awaiting a coroutine, a Task or a "
    "Future pauses the current coroutine until the awaitable is done, so the event loop can run other work.",
    "The event loop runs asynchronous tasks and callbacks, performs network IO and runs subprocesses. "
    "loop.run_until_complete(), loop.call_soon() and loop.call_later() schedule work; loop.stop() ends it.",
    "asyncio.create_task() wraps a coroutine in a Task and schedules it. gather() runs awaitables "
    "concurrently and collects their results; wait_for() waits with a timeout and cancels the task when "
    "the timeout expires.",
    "A Future is an awaitable holding the eventual result of an asynchronous operation: set_result() and "
    "set_exception() mark it done, add_done_callback() schedules a callback, and cancel() makes the awaiting "
    "coroutine receive CancelledError.",
    "Streams are async/await-ready primitives for network connections: open_connection() returns a reader "
    "and a writer; await reader.readline(), then writer.write(data) followed by await writer.drain().",
    "Transports and protocols: the event loop calls protocol callbacks such as connection_made(), "
    "data_received() and connection_lost(); pause_reading() and resume_reading() give flow control.",
    "Synchronization primitives for tasks: asyncio.Lock, Event, Condition and Semaphore are used with async "
    "with; an asyncio.Queue lets producer and consumer coroutines exchange items with await put() and get().",
]

# asyncio modules whose docstrings are the evaluation text and never enter the corpus (~23k characters).
HELD_OUT_MODULES = ("asyncio.locks", "asyncio.queues", "asyncio.runners", "asyncio.streams", "asyncio.timeouts",
                    "asyncio.transports")


def stdlib_docstrings() -> list[tuple[str, str]]:
    """(module, text) for every standard-library module with docstrings: the module's, its classes'
    and functions' docstrings joined by blank lines, read with ``ast`` (nothing is imported). Test
    packages are skipped. Sorted by module name."""
    return list(_stdlib_docstrings())


@functools.lru_cache(maxsize=1)  # parsing ~700 files takes seconds; the commands ask more than once
def _stdlib_docstrings() -> tuple[tuple[str, str], ...]:
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in ("test", "tests", "idle_test", "site-packages", "__pycache__"))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            try:
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue  # a few files are templates or in other encodings
            parts = [ast.get_docstring(node) for node in ast.walk(tree)
                     if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
            body = "\n\n".join(p for p in parts if p)
            if body.strip():
                out.append((os.path.relpath(path, root)[:-3].replace(os.sep, "."), body))
    return tuple(sorted(out))


def builtin_split() -> tuple[list[str], list[str]]:
    """(general corpus documents, held-out asyncio evaluation documents) of the built-in default."""
    docstrings = stdlib_docstrings()
    held = [t for m, t in docstrings if m in HELD_OUT_MODULES]
    if not held:
        raise RuntimeError(f"none of the held-out modules {HELD_OUT_MODULES} has docstrings in this Python")
    general = text.builtin_python_docs() + [t for m, t in docstrings if m not in HELD_OUT_MODULES]
    return general, held


def read_source(source: str, *, field: str = "text") -> list[str]:
    """Documents of a built-in source (``builtin:python-docs+docstrings``, ``builtin:asyncio-seeds``,
    ``builtin:asyncio-heldout``) or of anything ``ssae_kernels.text.read_texts`` reads."""
    if source == BUILTIN_CORPUS:
        return builtin_split()[0]
    if source == BUILTIN_EVAL:
        return builtin_split()[1]
    if source == BUILTIN_SEEDS:
        return list(ASYNCIO_SEEDS)
    return text.read_texts(source, field=field)


def read_seeds(source: str, *, field: str = "text") -> list[str]:
    """Seed texts: a .txt file is split into blank-line separated paragraphs (one seed per paragraph),
    anything else is read by ``read_source``."""
    if source.endswith(".txt") and os.path.isfile(source):
        with open(source, encoding="utf-8") as f:
            seeds = [p.strip() for p in f.read().split("\n\n") if p.strip()]
    else:
        seeds = read_source(source, field=field)
    if not seeds:
        raise ValueError(f"seed source {source!r} holds no text")
    return seeds
