"""Text sources for harvesting activations: local files, a Hugging Face dataset, or the built-in default."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator

BUILTIN = "builtin:python-docs"
_SUFFIXES = (".txt", ".jsonl", ".parquet")


def builtin_python_docs() -> list[str]:
    """Python's own documentation (pydoc_data.topics, ~465k characters), one document per topic.

    Every CPython install has it, so the default runs offline."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def check_source(source: str, field: str = "text") -> None:
    """Raises a ValueError naming ``source`` when it cannot be read, before anything slow is loaded."""
    if source == BUILTIN:
        return
    if os.path.isdir(source):
        if not any(n.endswith(_SUFFIXES) for n in os.listdir(source)):
            raise ValueError(f"text source {source}: the directory holds no {'/'.join(_SUFFIXES)} file")
    elif os.path.exists(source):
        if not source.endswith(_SUFFIXES):
            raise ValueError(f"text source {source}: unsupported file type; use {', '.join(_SUFFIXES)}")
    elif source.endswith(_SUFFIXES) or os.sep in source and not _looks_like_hub_id(source):
        raise ValueError(f"text source {source}: no such file")
    else:
        from .models import hub_reachable

        if importlib.util.find_spec("datasets") is None:
            raise ValueError(f"text source {source}: not a local file; reading it as a Hugging Face dataset "
                             "needs `pip install datasets`")
        if not hub_reachable():
            raise ValueError(f"text source {source}: not a local file, and the Hugging Face hub is unreachable "
                             "(offline?)")


def _looks_like_hub_id(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/", "~"))


def read_texts(source: str, *, field: str = "text", split: str = "train", limit: int | None = None) -> list[str]:
    """Documents from ``source``: ``builtin:python-docs``, a .txt/.jsonl/.parquet file or a directory of
    them, or a Hugging Face dataset name (needs ``datasets`` and a reachable hub)."""
    if source == BUILTIN:
        docs = builtin_python_docs()
    elif os.path.isdir(source):
        docs = [d for name in sorted(os.listdir(source)) if name.endswith((".txt", ".jsonl", ".parquet"))
                for d in _read_file(os.path.join(source, name), field)]
    elif os.path.isfile(source):
        docs = list(_read_file(source, field))
    elif source.endswith(_SUFFIXES):
        raise FileNotFoundError(f"text source {source!r} does not exist")
    else:
        docs = _read_hub_dataset(source, field, split, limit)
    docs = [d for d in docs if d and d.strip()]
    if limit is not None:
        docs = docs[:limit]
    if not docs:
        raise ValueError(f"text source {source!r} holds no text")
    return docs


def _read_file(path: str, field: str) -> Iterator[str]:
    try:
        yield from _read_records(path, field)
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def _read_records(path: str, field: str) -> Iterator[str]:
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            # blank-line separated paragraphs grouped into documents of reasonable size
            yield from _split_paragraphs(f.read())
    elif path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{path}:{line_no}: not valid JSON ({error.msg})") from None
                    if not isinstance(record, dict) or field not in record:
                        fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                        raise ValueError(f"{path}:{line_no} has no field {field!r} (found: {fields}); "
                                         "see --text-field")
                    if not isinstance(record[field], str):
                        raise ValueError(f"{path}:{line_no}: field {field!r} is not a string")
                    yield record[field]
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=[field])
        yield from table.column(field).to_pylist()
    else:
        raise ValueError(f"unsupported text file {path!r}: use .txt, .jsonl or .parquet")


def _split_paragraphs(text: str, target_chars: int = 4000) -> Iterator[str]:
    doc = []
    size = 0
    for paragraph in text.split("\n\n"):
        doc.append(paragraph)
        size += len(paragraph)
        if size >= target_chars:
            yield "\n\n".join(doc)
            doc, size = [], 0
    if doc:
        yield "\n\n".join(doc)


def _read_hub_dataset(name: str, field: str, split: str, limit: int | None) -> list[str]:
    try:
        import datasets
    except ImportError as error:
        raise ValueError(f"text source {name!r} is neither a file nor a directory; loading it as a Hugging Face "
                         f"dataset needs `pip install datasets` ({error})") from None
    ds = datasets.load_dataset(name, split=split, streaming=limit is not None)
    out = []
    for record in ds:
        out.append(record[field])
        if limit is not None and len(out) >= limit:
            break
    return out
