"""Tokenized shards: the on-disk format the loader reads, and step 3 of ``prepare``.

Knows how to turn a stream of documents into fixed-size binary token files plus
a JSON manifest, and how to resume that after a crash; knows nothing about
cleaning (step 1) or batching (``loader``).

Format (``manifest.json``, ``"format": "lmforge.shards"``):

* splits ``train``, ``val`` (validation: for choosing settings) and ``test`` (for
  reporting), each a set of whole documents; a directory written before the test
  split existed has only ``train`` and ``val`` and still loads.
* ``{split}-{k:05d}.bin``: raw little-endian ``uint16`` (vocab <= 65,536) or
  ``uint32`` tokens, exactly ``shard_tokens`` of them except in the last shard of
  a split. Every document starts with the document token (``<|bos|>`` by default).
  Documents run across shard boundaries: the splits are one token stream each.
* ``{split}-{k:05d}.idx.json``: ``{"starts": [...], "ids": [...]}``, the offset in
  the shard where each document starting there begins, and its id.
* the manifest lists each shard with its token count and sha256, the tokenizer
  (file, sha256 of the file, ``canonical_sha256`` of its canonical lmforge JSON,
  vocab size, document token), per-split documents / bytes / tokens, and while
  incomplete, where each split stopped. ``check_shards_tokenizer`` refuses
  shards made by another tokenizer (manifests older than ``canonical_sha256``:
  a warning).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from .._io import atomic_open, write_json
from ._steps import step_bar, step_hash

ENCODE_BATCH_CHARS = 4 << 20  # documents are tokenized in batches of about this much text ...
ENCODE_BATCH_DOCS = 1024  # ... or this many documents (memory: a constant, whatever the corpus size)
FORMAT = "lmforge.shards"
VERSION = 1
SPLITS = ("train", "val", "test")  # directories written before the test split have only train and val

log = logging.getLogger("lmforge.data")


def tokenizer_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        for name in ("tokenizer.lmforge.json", "tokenizer.json", "tokenizer.model"):
            if (p / name).exists():
                return p / name
        raise FileNotFoundError(f"{p}: no tokenizer.lmforge.json, tokenizer.json or tokenizer.model inside")
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such tokenizer file or directory")
    return p


def resolve_doc_token(tok, name: str) -> int | None:
    if name == "":
        return None
    if name == "auto":
        from ..tokenize.special import DOC_CANDIDATES

        for cand in DOC_CANDIDATES:
            if cand in tok.special_tokens:
                return tok.special_tokens[cand]
        raise ValueError(f"the tokenizer has none of {', '.join(DOC_CANDIDATES)} to start documents with; "
                         "set shards.doc_token to one of its special tokens, or to '' for none")
    if name not in tok.special_tokens:
        raise ValueError(f"shards.doc_token {name!r} is not a special token of this tokenizer "
                         f"(it has: {', '.join(sorted(tok.special_tokens)) or 'none'})")
    return tok.special_tokens[name]


def _sha256_bytes(b) -> str:
    return hashlib.sha256(b).hexdigest()


class ShardWriter:
    """Appends documents' tokens to one split's fixed-size shards."""

    def __init__(self, out: Path, split: str, dtype, shard_tokens: int, state: dict, on_flush):
        self.out, self.split, self.dtype, self.cap = out, split, np.dtype(dtype), shard_tokens
        self.buf = np.empty(shard_tokens, dtype=self.dtype)
        self.fill = 0
        self.starts: list[int] = []
        self.ids: list[str] = []
        # ``state`` lives in the manifest and changes only when a shard is on disk;
        # ``live`` runs ahead of it with what is still in the buffer.
        self.state = state  # {"shards": [...], "doc": d, "offset": o, "documents", "bytes", "tokens"}
        self.live = {k: state[k] for k in ("doc", "offset", "documents", "bytes", "tokens")}
        self.on_flush = on_flush

    def add(self, g: int, doc_id: str, nbytes: int, tokens: np.ndarray, skip: int = 0) -> None:
        live = self.live
        if skip == 0:
            self.starts.append(self.fill)
            self.ids.append(doc_id)
            live["documents"] += 1
            live["bytes"] += nbytes
        pos = skip
        n = len(tokens)
        while pos < n:
            take = min(n - pos, self.cap - self.fill)
            self.buf[self.fill:self.fill + take] = tokens[pos:pos + take]
            self.fill += take
            pos += take
            live["tokens"] += take
            if self.fill == self.cap:
                live["doc"], live["offset"] = (g, pos) if pos < n else (g + 1, 0)
                self.flush()
        live["doc"], live["offset"] = g + 1, 0

    def flush(self) -> None:
        if self.fill == 0:
            return
        k = len(self.state["shards"])
        name = f"{self.split}-{k:05d}"
        data = self.buf[: self.fill].astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
        with atomic_open(self.out / f"{name}.bin", "wb") as f:
            f.write(data)
        write_json(self.out / f"{name}.idx.json", {"starts": self.starts, "ids": self.ids})
        self.state["shards"].append({"file": f"{name}.bin", "index": f"{name}.idx.json", "tokens": self.fill,
                                     "documents_starting": len(self.starts), "sha256": _sha256_bytes(data)})
        self.state.update(self.live)
        self.fill = 0
        self.starts, self.ids = [], []
        self.on_flush()


def _iter_kept(work: Path, summaries: list[dict], start: int):
    """(global index, id, source, text, bytes) of step-1 documents from index ``start`` on."""
    g = 0
    for s in summaries:
        if s["index"] < 0:
            continue
        n = s["docs_out"]
        if g + n <= start:
            g += n
            continue
        with open(work / f"chunk-{s['index']:05d}.jsonl", encoding="utf-8") as f:
            for line in f:
                if g >= start:
                    d = json.loads(line)
                    yield g, d["id"], d["source"], d["text"]
                g += 1


def step_shards(cfg, work: Path, out: Path, tokenizer_path, summaries: list[dict], dedup: dict,
                quiet: bool = False) -> dict:
    from ..tokenize import load
    from .._io import file_sha256

    tok_file = tokenizer_file(tokenizer_path)
    tok_sha = file_sha256(tok_file)
    tok = load(tok_file)
    doc_token = resolve_doc_token(tok, cfg.shards.doc_token)
    dtype = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
    sc = cfg.shards
    key = step_hash("shards", VERSION, SPLITS, dedup["key"], tok_sha, sc.shard_tokens, sc.doc_token)
    mpath = out / "manifest.json"
    manifest = None
    if mpath.exists():
        try:
            manifest = json.loads(mpath.read_text())
        except ValueError:
            manifest = None
    if manifest and manifest.get("key") == key and manifest.get("complete"):
        return manifest
    if not manifest or manifest.get("key") != key:  # start over: remove shards of another run
        for p in [p for sp in SPLITS for p in out.glob(f"{sp}-*")]:
            p.unlink()
        manifest = {
            "format": FORMAT, "version": VERSION, "key": key, "complete": False, "dtype": dtype,
            "shard_tokens": sc.shard_tokens,
            "tokenizer": {"file": f"tokenizer/{tok_file.name}", "source": str(tok_file), "sha256": tok_sha,
                          "canonical_sha256": tokenizer_fingerprint(tok), "kind": tok.kind,
                          "vocab_size": tok.vocab_size,
                          "doc_token": None if doc_token is None else tok.id_to_token(doc_token),
                          "doc_token_id": doc_token},
            "splits": {s: {"shards": [], "doc": 0, "offset": 0, "documents": 0, "bytes": 0, "tokens": 0}
                       for s in SPLITS},
        }
        (out / "tokenizer").mkdir(exist_ok=True)
        shutil.copyfile(tok_file, out / "tokenizer" / tok_file.name)
    else:  # resume: drop shard files the manifest does not claim (a crash between write and manifest)
        claimed = {sh[k] for sp in manifest["splits"].values() for sh in sp["shards"] for k in ("file", "index")}
        for p in [p for sp in SPLITS for p in out.glob(f"{sp}-*")]:
            if p.name not in claimed:
                p.unlink()
    splits = manifest["splits"]

    def save_manifest():
        write_json(mpath, manifest, indent=1)

    writers = {s: ShardWriter(out, s, dtype, sc.shard_tokens, splits[s], save_manifest) for s in SPLITS}
    resume = {s: (splits[s]["doc"], splits[s]["offset"]) for s in SPLITS}
    removed = set(dedup["removed"])
    val = set(dedup["val"])
    test = set(dedup.get("test", []))
    start = min(r[0] for r in resume.values())
    total_bytes = sum(s.get("bytes_out", 0) for s in summaries)
    bar = step_bar(total_bytes, "shards", quiet=quiet)
    t0 = time.perf_counter()
    prefix = np.array([doc_token] if doc_token is not None else [], dtype=np.int64)
    batch: list[tuple] = []
    batch_chars = 0

    def run_batch():
        texts = [b[3] for b in batch]
        ids = tok.encode_batch(texts, disallowed_special=())
        for (g, doc_id, split, text, nbytes, skip), t in zip(batch, ids):
            arr = np.concatenate([prefix, np.asarray(t, dtype=np.int64)])
            writers[split].add(g, doc_id, nbytes, arr, skip)
            bar.update(nbytes)

    for g, doc_id, source, text in _iter_kept(work, summaries, start):
        if g in removed:
            continue
        split = "val" if g in val else "test" if g in test else "train"
        rdoc, roff = resume[split]
        if g < rdoc:
            continue
        skip = roff if g == rdoc else 0
        nbytes = len(text.encode("utf-8", "surrogatepass"))
        batch.append((g, doc_id, split, text, nbytes, skip))
        batch_chars += len(text)
        if batch_chars >= ENCODE_BATCH_CHARS or len(batch) >= ENCODE_BATCH_DOCS:
            run_batch()
            batch, batch_chars = [], 0
    if batch:
        run_batch()
    for w in writers.values():
        w.flush()
    bar.close()
    for sp in splits.values():
        sp.pop("doc", None)
        sp.pop("offset", None)
    manifest["complete"] = True
    manifest["tokenize_seconds"] = round(time.perf_counter() - t0, 3)
    save_manifest()
    return manifest


def tokenizer_fingerprint(tok) -> str:
    """sha256 of the tokenizer's canonical lmforge JSON (sorted keys, no whitespace): the same for
    one tokenizer whichever file it was read from (lmforge JSON, HF tokenizer.json, .model) and
    for the copy a model directory saves, unlike the sha256 of the file. Canonical: a named
    pre-tokenization preset as lmforge spells it (HF files spell cl100k's regex another,
    equivalent way), and without the sentencepiece metadata kept for a ``.model`` round trip
    (the trainer spec and such: they do not change a single id)."""
    from ..tokenize.pretokenize import PATTERNS

    d = dict(tok.to_dict())
    d.pop("sentencepiece", None)
    if d.get("pattern_name") in PATTERNS:
        d["pattern"] = PATTERNS[d["pattern_name"]]
    blob = json.dumps(d, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return _sha256_bytes(blob.encode("utf-8", "surrogatepass"))


def check_shards_tokenizer(manifest: dict, where, tok=None, tok_name: str = "the model's tokenizer",
                           vocab_size: int | None = None) -> None:
    """Refuse shards made by another tokenizer than ``tok`` (named ``tok_name`` in the message) or
    holding token ids a model of ``vocab_size`` embeddings cannot embed. A manifest written before
    the canonical hash was recorded: a logged warning, and the check is skipped."""
    rec = manifest.get("tokenizer") or {}
    made = (f"{rec.get('source') or rec.get('file') or 'an unnamed tokenizer'} ({rec.get('kind', '?')}, "
            f"vocab {rec.get('vocab_size', '?')}")
    if vocab_size is not None and isinstance(rec.get("vocab_size"), int) and rec["vocab_size"] > vocab_size:
        raise ValueError(f"{where}: the shards were made by {made}), whose ids go up to {rec['vocab_size'] - 1}, "
                         f"but the model has only {vocab_size} embeddings; evaluate a model trained on this "
                         "tokenizer, or prepare the data again with the model's tokenizer")
    if tok is None:
        return
    want = rec.get("canonical_sha256")
    if want is None:
        log.warning("%s: the manifest does not record its tokenizer's canonical sha256 (written by an older "
                    "lmforge); cannot check that %s made these shards", where, tok_name)
        return
    got = tokenizer_fingerprint(tok)
    if got != want:
        raise ValueError(f"{where}: these shards were made by another tokenizer than {tok_name}: shards: {made}, "
                         f"sha256 {want[:16]}); {tok_name}: {tok.kind}, vocab {tok.vocab_size}, sha256 {got[:16]}. "
                         "Prepare the data again with this tokenizer (`lmforge data prepare --tokenizer ...`) "
                         "or use the model trained on these shards")


def missing_data_dir(path: str | os.PathLike) -> str:
    """The message for a ``--data`` directory that does not exist: "no such directory X", and the
    closest existing siblings (those holding a manifest first), e.g. "did you mean runs/data?"."""
    import difflib

    p = Path(path)
    parent = p.parent
    msg = f"no such directory {p}"
    if not parent.is_dir():
        return f"{msg} ({parent} does not exist either)"
    try:
        siblings = [q for q in parent.iterdir() if q.is_dir() and not q.name.startswith(".")]
    except OSError:
        return msg
    names = difflib.get_close_matches(p.name, [q.name for q in siblings], n=3, cutoff=0.6)
    names.sort(key=lambda n: not (parent / n / "manifest.json").exists())  # stable: closeness among equals
    if names:
        shown = " or ".join(str(parent / n) for n in names)
        msg += f" (did you mean {shown}?)"
    return msg


def load_manifest(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(missing_data_dir(p))
    mp = p / "manifest.json" if p.is_dir() else p
    if not mp.exists():
        raise FileNotFoundError(f"{p}: no manifest.json; run `lmforge data prepare --out {p}` first")
    try:
        m = json.loads(mp.read_text())
    except ValueError as e:
        raise ValueError(f"{mp}: not valid JSON ({e})") from None
    if m.get("format") != FORMAT:
        raise ValueError(f"{mp}: not an lmforge shards manifest")
    if not m.get("complete"):
        raise ValueError(f"{mp}: the prepare run that wrote it did not finish; rerun the same "
                         "`lmforge data prepare` command to resume it")
    return m
