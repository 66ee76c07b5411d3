"""Durable files: atomic writes that survive a crash (temp file, fsync, rename, fsync of the directory), and
checksums of weight files (``checksums.json``) verified when a directory is loaded."""

from __future__ import annotations

import hashlib
import json
import os

MANIFEST = "checksums.json"


class CorruptFileError(ValueError):
    """A file whose contents no longer match the checksum recorded when it was written."""


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync(path: str) -> None:
    """Flushes a file, or a directory's entries (renames and new names), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write) -> None:
    """``write(tmp_path)`` then fsync, rename over ``path`` and fsync of its directory: after a crash the
    path holds the old or the new contents, never a part."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        fsync(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync(os.path.dirname(os.path.abspath(path)))


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def write_checksums(directory: str, names: list[str]) -> None:
    """Records the sha256 of ``directory/name`` for each name (added to an existing manifest)."""
    manifest = read_checksums(directory) or {}
    manifest.update({name: sha256(os.path.join(directory, name)) for name in names})
    atomic_write_text(os.path.join(directory, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True))


def read_checksums(directory: str) -> dict[str, str] | None:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def verify_checksums(directory: str, names: list[str] | None = None) -> bool:
    """Checks the listed files (default: all in the manifest) against ``checksums.json``; raises
    CorruptFileError naming the first file that is missing or differs. False when there is no manifest."""
    manifest = read_checksums(directory)
    if manifest is None:
        return False
    for name in names if names is not None else sorted(manifest):
        path = os.path.join(directory, name)
        if name not in manifest:
            raise CorruptFileError(f"{path}: no checksum recorded in {os.path.join(directory, MANIFEST)}")
        if not os.path.isfile(path):
            raise CorruptFileError(f"{path}: missing (listed in {MANIFEST})")
        if sha256(path) != manifest[name]:
            raise CorruptFileError(f"{path}: contents do not match the checksum recorded when it was written "
                                   "(the file is corrupt or was changed)")
    return True
