"""Document sources: stream documents out of text files, JSONL and Parquet.

Knows how to turn files on disk into a stream of ``Document(id, text, source)``
one at a time, so a corpus far larger than memory can flow through; knows
nothing about cleaning, filtering or tokenizing.

Formats (chosen by file name):

* ``*.jsonl``, ``*.jsonl.gz``, ``*.jsonl.zst`` (also ``.json``/``.ndjson``): one
  JSON object per line, the text in ``text_field`` (default ``"text"``); an
  ``id`` field, when present, becomes the document id.
* ``*.parquet``: rows of the ``text_field`` column, read batch by batch (pyarrow).
* anything else: a plain UTF-8 text file is one document; ``*.gz`` / ``*.zst`` /
  ``*.zstd`` text (``a.txt.gz``) is decompressed first, and its id is the name
  without the compression suffix (``a.txt``), so the compressed and plain copies
  of a text give the same document and the same shards.

A document's id: the JSONL/Parquet ``id_field`` when present, else the file's
path relative to the input directory it was found under (``pkg/__init__.py``,
not ``__init__.py``), with ``:line`` / ``:row`` for JSONL and Parquet rows.

A directory is walked in sorted order. Bad input never stops the stream where
skipping is safe: each skipped or repaired item is recorded as a ``Problem``
(file, line, what) in the ``problems`` list the caller passes in. A file that
cannot be read at all (a corrupt Parquet footer) is skipped whole and recorded;
a truncated or corrupt ``.gz``/``.zst`` keeps what decoded before the damage (the
JSONL lines before it; for compressed text, the text before it, cut back to the
last whole line) and records a ``truncated`` problem.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
COMPRESSED = (".gz", ".zst", ".zstd")


@dataclass
class Document:
    id: str
    text: str
    source: str  # the file it came from
    meta: dict = field(default_factory=dict)


@dataclass
class Problem:
    file: str
    line: int | None  # 1-based line (JSONL) or row (Parquet); None for the whole file
    kind: str  # "invalid-utf8", "empty", "not-json", "missing-field", "truncated", "unreadable", ...
    action: str  # "skipped" (the item is gone) or "repaired" (kept, with replacement characters)
    detail: str = ""

    def as_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "kind": self.kind, "action": self.action,
                "detail": self.detail}


def input_files(inputs: Iterable[str | os.PathLike]) -> list[tuple[Path, str]]:
    """``(file, name)`` for every file named by ``inputs`` (directories walked recursively,
    sorted; hidden files skipped). ``name`` is the path relative to the directory given
    (``pkg/__init__.py``), or the file name for a file given directly: the id of a
    plain-text document, unique where base names repeat."""
    files: list[tuple[Path, str]] = []
    for p in inputs:
        p = Path(p)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file()
                           and not any(part.startswith(".") for part in f.relative_to(p).parts)
                           and f.name != "MANIFEST.json")
            files.extend((f, f.relative_to(p).as_posix()) for f in found)
        elif p.is_file():
            files.append((p, p.name))
        else:
            raise FileNotFoundError(f"{p}: no such input file or directory")
    return files


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files named by ``inputs`` (directories walked recursively, sorted; hidden files skipped)."""
    return [f for f, _ in input_files(inputs)]


def file_format(path: Path) -> str:
    name = path.name.lower()
    for c in COMPRESSED:
        if name.endswith(c):
            name = name[: -len(c)]
            break
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def _decode(data: bytes, where: str, line: int | None, problems: list, errors: str) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        # the line of the first bad byte, for the report
        bad_line = (line or 1) + data.count(b"\n", 0, e.start)
        if errors == "skip":
            problems.append(Problem(where, bad_line, "invalid-utf8", "skipped", f"byte {e.start}: "
                                    f"{data[e.start:e.start + 4]!r}"))
            return None
        problems.append(Problem(where, bad_line, "invalid-utf8", "repaired",
                                f"byte {e.start}: {data[e.start:e.start + 4]!r} -> U+FFFD"))
        return data.decode("utf-8", errors="replace")


def _open_binary(path: Path):
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith((".zst", ".zstd")):
        try:
            import zstandard
        except ImportError:
            raise ImportError(f"{path}: reading .zst needs the zstandard package (pip install zstandard)") from None
        return io.BufferedReader(_ZstdRaw(open(path, "rb"), zstandard), buffer_size=1 << 20)
    return open(path, "rb")


class _ZstdRaw(io.RawIOBase):
    """Decompressed bytes of a file of zstd frames. Unlike ``stream_reader``, a stream that ends
    inside a frame is an ``EOFError`` (after the bytes decoded before it), not a quiet end."""

    def __init__(self, f, zstandard):
        self.f, self.z = f, zstandard
        self.d = zstandard.ZstdDecompressor().decompressobj()
        self.pending = b""
        self.started = False  # a frame has begun and not ended

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self.pending:
            data = self.f.read(1 << 16)
            if not data:
                if self.started:
                    raise EOFError("zstd stream ends inside a frame (truncated)")
                return 0
            while data:
                self.started = True
                self.pending += self.d.decompress(data)
                data = b""
                if self.d.eof:
                    data = self.d.unused_data
                    self.d = self.z.ZstdDecompressor().decompressobj()
                    self.started = False
        n = min(len(b), len(self.pending))
        b[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


def _strip_compression(name: str) -> str:
    low = name.lower()
    for c in COMPRESSED:
        if low.endswith(c) and len(name) > len(c):
            return name[: -len(c)]
    return name


def _read_compressed(path: Path, problems: list) -> bytes:
    """The decompressed bytes of ``path``; on damage, those decoded before it (cut back to the
    last whole line), with a ``truncated`` problem recorded."""
    chunks: list[bytes] = []
    try:
        with _open_binary(path) as raw:
            while True:
                b = raw.read1(1 << 16)  # small steps: a failing read loses only its own bytes
                if not b:
                    break
                chunks.append(b)
        return b"".join(chunks)
    except Exception as e:  # EOFError, gzip.BadGzipFile (an OSError), zlib.error, zstandard.ZstdError
        if not isinstance(e, (EOFError, OSError, zlib.error)) and type(e).__name__ != "ZstdError":
            raise
        data = b"".join(chunks)
        cut = data.rfind(b"\n") + 1
        kept = data[:cut]
        lines = kept.count(b"\n")
        problems.append(Problem(str(path), lines + 1, "truncated", "skipped",
                                f"compressed stream ends early or is corrupt ({type(e).__name__}: {e}); "
                                f"kept the {len(kept):,} bytes ({lines} lines) decoded before the damage"))
        return kept


def read_text(path: Path, problems: list, utf8_errors: str = "replace", name: str | None = None) -> Iterator[Document]:
    name = name or path.name
    if path.name.lower().endswith(COMPRESSED):
        data = _read_compressed(path, problems)
        name = _strip_compression(name)
        if not data.strip() and problems and problems[-1].file == str(path) and problems[-1].kind == "truncated":
            return  # nothing survived; the problem is recorded already
    else:
        data = path.read_bytes()
    if not data.strip():
        problems.append(Problem(str(path), None, "empty", "skipped", f"{len(data)} bytes"))
        return
    text = _decode(data, str(path), 1, problems, utf8_errors)
    if text is not None:
        yield Document(id=name, text=text, source=str(path))


def read_jsonl(path: Path, problems: list, text_field: str = "text", id_field: str = "id",
               utf8_errors: str = "replace", name: str | None = None) -> Iterator[Document]:
    lineno = 0
    stem = name or path.name
    try:
        with _open_binary(path) as raw:
            for raw_line in raw:
                lineno += 1
                if not raw_line.strip():
                    continue
                s = _decode(raw_line, str(path), lineno, problems, utf8_errors)
                if s is None:
                    continue
                try:
                    obj = json.loads(s)
                except json.JSONDecodeError as e:
                    problems.append(Problem(str(path), lineno, "not-json", "skipped", str(e)[:120]))
                    continue
                if not isinstance(obj, dict) or text_field not in obj:
                    problems.append(Problem(str(path), lineno, "missing-field", "skipped",
                                            f"no {text_field!r} field"))
                    continue
                text = obj[text_field]
                if not isinstance(text, str):
                    problems.append(Problem(str(path), lineno, "wrong-type", "skipped",
                                            f"{text_field!r} is {type(text).__name__}, expected a string"))
                    continue
                if not text.strip():
                    problems.append(Problem(str(path), lineno, "empty", "skipped", "empty text"))
                    continue
                doc_id = obj.get(id_field)
                yield Document(id=str(doc_id) if doc_id is not None else f"{stem}:{lineno}", text=text,
                               source=str(path))
    except (EOFError, OSError, zlib.error) as e:
        problems.append(Problem(str(path), lineno + 1, "truncated", "skipped",
                                f"stream ends early ({type(e).__name__}: {e}); kept the {lineno} lines before"))
    except Exception as e:  # zstandard.ZstdError and friends
        if type(e).__name__ != "ZstdError":
            raise
        problems.append(Problem(str(path), lineno + 1, "truncated", "skipped",
                                f"stream ends early ({e}); kept the {lineno} lines before"))


def read_parquet(path: Path, problems: list, text_field: str = "text", id_field: str = "id",
                 batch_size: int = 1024, name: str | None = None) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        problems.append(Problem(str(path), None, "unreadable", "skipped", f"not a readable Parquet file: {e}"))
        return
    names = pf.schema_arrow.names
    if text_field not in names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}); "
                         "set text_field to the column holding the text")
    cols = [text_field] + ([id_field] if id_field in names else [])
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_size, columns=cols):
            texts = batch.column(0).to_pylist()
            ids = batch.column(1).to_pylist() if len(cols) > 1 else [None] * len(texts)
            for text, doc_id in zip(texts, ids):
                row += 1
                if not isinstance(text, str) or not text.strip():
                    problems.append(Problem(str(path), row, "empty", "skipped", "null or empty text"))
                    continue
                yield Document(id=str(doc_id) if doc_id is not None else f"{name or path.name}:{row}", text=text,
                               source=str(path))
    except Exception as e:
        problems.append(Problem(str(path), row + 1, "unreadable", "skipped",
                                f"corrupt data after row {row}: {type(e).__name__}: {e}"))


def iter_documents(inputs: Iterable[str | os.PathLike], problems: list | None = None, *,
                   text_field: str = "text", id_field: str = "id",
                   utf8_errors: str = "replace") -> Iterator[Document]:
    """Stream every document of ``inputs`` (files or directories) in a fixed order."""
    if utf8_errors not in ("replace", "skip"):
        raise ValueError(f"utf8_errors must be 'replace' or 'skip', got {utf8_errors!r}")
    problems = [] if problems is None else problems
    for path, name in input_files(inputs):
        fmt = file_format(path)
        if fmt == "jsonl":
            yield from read_jsonl(path, problems, text_field, id_field, utf8_errors, name=name)
        elif fmt == "parquet":
            yield from read_parquet(path, problems, text_field, id_field, name=name)
        else:
            yield from read_text(path, problems, utf8_errors, name=name)
