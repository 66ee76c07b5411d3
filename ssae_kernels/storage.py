"""Durable files: atomic writes that survive a crash (temp file, fsync, rename, fsync of the directory),
checksums of weight files (``checksums.json``) verified when a directory is loaded, and checked reading of
configs and weights (errors that name the file, the key or the tensor)."""

from __future__ import annotations

import dataclasses
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


def read_json_object(path: str) -> dict:
    """The JSON object in ``path``; ValueError naming the file when it is not valid JSON or not an object."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def read_config(path: str, config_class, required_ints: tuple[str, ...]):
    """``config_class(**the JSON object in path)``, checked: ValueError naming the file and the key when a
    required int is missing or not an int, a key is unknown, or the dataclass rejects a value."""
    raw = read_json_object(path)
    missing = [key for key in required_ints if key not in raw]
    if missing:
        raise ValueError(f"{path}: missing key {missing[0]!r} (required: {', '.join(required_ints)})")
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown} (known: {sorted(known)})")
    for key in required_ints:
        if isinstance(raw[key], bool) or not isinstance(raw[key], int):
            raise ValueError(f"{path}: key {key!r} must be a positive int, got {raw[key]!r}")
    try:
        return config_class(**raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def verify_weights(directory: str, name: str) -> bool:
    """``storage.verify_checksums`` of one file (CorruptFileError naming it when it differs); also a
    CorruptFileError, naming the manifest, when ``checksums.json`` itself is unreadable. False without one."""
    try:
        return verify_checksums(directory, [name])
    except CorruptFileError:
        raise
    except (ValueError, AttributeError, TypeError) as e:  # not JSON, or not a JSON object of names
        raise CorruptFileError(f"{os.path.join(directory, MANIFEST)}: unreadable checksum manifest ({e})") from None


def read_safetensors(path: str, rows: range | None = None, sharded=()) -> dict:
    """The tensors of a safetensors file (on the CPU); CorruptFileError naming the file when it cannot be parsed.
    With ``rows``, the tensors named in ``sharded`` are read at those rows only."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {name: f.get_slice(name)[rows.start:rows.stop] if rows is not None
                    and name in sharded else f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError on a truncated file)
        if isinstance(e, FileNotFoundError):
            raise
        raise CorruptFileError(f"{path}: not a readable safetensors file ({e})") from None


def check_shapes(weights_path: str, tensors: dict, spec: dict[str, tuple[str, ...]],
                 dims: dict[str, int], cfg_path: str) -> None:
    """ValueError naming the weights file and the tensor when a tensor is missing, unexpected or not of its
    shape. ``spec`` gives each tensor's shape as config keys, ``dims`` their values read from ``cfg_path``."""
    missing = [name for name in spec if name not in tensors]
    if missing:
        raise ValueError(f"{weights_path}: missing tensor {missing[0]!r} (expected {sorted(spec)})")
    extra = sorted(set(tensors) - set(spec))
    if extra:
        raise ValueError(f"{weights_path}: unexpected tensors {extra} (expected {sorted(spec)})")
    for name, keys in spec.items():
        expected, found = [dims[key] for key in keys], list(tensors[name].shape)
        if found != expected:
            source = ", ".join(f"{key}={dims[key]}" for key in dict.fromkeys(keys)) or "a scalar"
            raise ValueError(f"{weights_path}: tensor {name!r} has shape {found}, expected {expected} "
                             f"({source} in {cfg_path})")
