"""Small file helpers shared by every stage: atomic writes and the cache home.

Knows nothing about tokenizers or models; it only moves bytes safely.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path


def native_extension(name: str):
    """The compiled extension module ``name`` (e.g. ``"lmforge.infer._decode"``), or None when
    it was not built or ``LMFORGE_NO_NATIVE=1`` asks for the pure-Python/PyTorch paths."""
    import importlib

    if os.environ.get("LMFORGE_NO_NATIVE") == "1":
        return None
    try:
        return importlib.import_module(name)
    except ImportError:  # pragma: no cover - depends on the build
        return None


def lmforge_home() -> Path:
    """The cache directory: ``$LMFORGE_HOME`` or ``~/.cache/lmforge``."""
    return Path(os.environ.get("LMFORGE_HOME") or Path.home() / ".cache" / "lmforge")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """Open a temporary file beside ``path``; on success fsync and rename it over
    ``path``. On any error the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        kwargs = {} if "b" in mode else {"encoding": encoding, "newline": ""}
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file, read in 1 MB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: str | os.PathLike, obj, indent: int | None = None) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent)
        f.write("\n")


def read_text_file(path: str | os.PathLike) -> str:
    """Read a UTF-8 text file, with an error naming the file and the bad byte offset."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 4]!r}); "
            "expected a UTF-8 text file"
        ) from None


def read_json_object(path: str | os.PathLike) -> dict:
    """The JSON object in a file; invalid JSON, bad UTF-8 or another JSON value is an error naming the file."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The JSON objects of a JSONL file, blank lines skipped; a line that is not a JSON object is an
    error naming ``file:line``."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for k, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{k}: not a JSON line ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{k}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows
