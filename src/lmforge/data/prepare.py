"""``prepare``: files in, tokenized shards out, in three resumable steps.

Knows the order of the data stages and how to make them restartable; the
stages themselves live in ``clean``, ``filters``, ``pii``, ``dedup`` and
``shards``. Layout of the output directory::

    manifest.json          what the loader reads (written last, atomically)
    report.json            every count: problems, cleaning, filters, PII, dedup, split
    train-00000.bin ...    tokens, uint16 or uint32, fixed size except the last
    train-00000.idx.json   where each document starts in that shard, and its id
    val-00000.bin ...      validation: whole documents held out for choosing settings
    test-00000.bin ...     test: whole documents held out for the reported number
    work/                  step outputs kept for reuse (delete to save disk)

1. **documents** (streaming, all cores): read, clean, filter, scrub PII, check
   decontamination, fingerprint (exact hash + MinHash). Documents are grouped
   into chunks of ``chunk_bytes``; each chunk's output is written atomically and
   named by a content hash of its documents and the config, so a rerun or a
   resumed run skips every chunk already done.
2. **dedup and split** (a few bytes per document in memory): exact clusters,
   then LSH near-duplicate clusters (a cluster keeps its listed held-out member,
   so the other editions of a held-out text leave training); hold out the
   validation and test documents (listed ids, or a seeded hash of the ids up to
   about ``val_fraction`` / ``test_fraction`` of the bytes); then list every
   ``decontam.ngram``-word passage a training document shares with a held-out one.
3. **shards** (all cores): tokenize the surviving documents in stream order,
   each prefixed by the document token, into fixed-size shards. The manifest
   records after each finished shard where each split stopped (document and
   token offset), so an interrupted run continues without duplicating or
   losing documents; it never lists a shard that is not completely written.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .._config import apply_overrides, from_dict, load_file
from .._io import atomic_open, write_json
from .clean import CleanConfig, clean_text
from .dedup import (DedupConfig, MinHasher, band_keys, exact_clusters, exact_key, hash_words, lsh_params,
                    near_clusters, words_of)
from .filters import Decontaminator, FilterConfig, apply_filters
from .pii import scrub
from .sources import Problem, expand_inputs, iter_documents
from ._steps import step_bar, step_hash

STEP1_VERSION = 1  # bump when step 1's output for the same config changes
MAX_EXAMPLES = 3

log = logging.getLogger("lmforge.data")


@dataclass
class DecontamConfig:
    eval_files: list[str] = field(default_factory=list)  # files or directories of evaluation texts
    ngram: int = 13
    action: str = "drop"  # "drop" the document or only "flag" it in the report
    # training documents sharing an n-gram with a validation or test document (step 2):
    # "flag" (name them and the passages in the report), "drop" them from training, or "off"
    heldout: str = "flag"
    heldout_max_grams: int = 2_000_000  # beyond this (12 bytes each), a fixed hash-sample of the held-out n-grams


@dataclass
class ShardConfig:
    shard_tokens: int = 1 << 20  # tokens per shard file (the last one of a split may be shorter)
    # Two held-out splits of whole documents: validation (choosing settings: early stopping,
    # sweeps) and test (the reported number; never read while choosing anything).
    val_fraction: float = 0.05  # share of the kept *bytes* held out for validation (at least one document)
    test_fraction: float = 0.05  # share of the kept bytes held out for test (at least one document)
    val_docs: list[str] = field(default_factory=list)  # explicit validation document ids instead of the fraction
    test_docs: list[str] = field(default_factory=list)  # explicit test document ids instead of the fraction
    doc_token: str = "auto"  # prefix of every document: auto = <|bos|>, else <|endoftext|>; "" = none
    seed: int = 0  # which documents the seeded hash holds out
    warn_tokens: int = 50_000  # a held-out split with fewer tokens, or fewer documents than
    warn_documents: int = 3  # this, is reported as too small to measure anything


@dataclass
class PrepareConfig:
    inputs: list[str] = field(default_factory=list)
    text_field: str = "text"
    id_field: str = "id"
    utf8_errors: str = "replace"  # invalid UTF-8: "replace" with U+FFFD (reported) or "skip" the document
    pii: bool = True
    clean: CleanConfig = field(default_factory=CleanConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    decontam: DecontamConfig = field(default_factory=DecontamConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    workers: int = 0  # 0: every core
    chunk_bytes: int = 2 << 20  # text per step-1 work unit


def make_config(inputs: list[str] | None = None, config_file: str | None = None,
                overrides: list[str] | None = None) -> PrepareConfig:
    """The config for ``prepare``: defaults, then a config file, then ``--input``, then ``--set``.

    With no inputs at all the built-in Shakespeare corpus is used with its own
    recommended settings (``CORPORA[...].prepare_defaults``)."""
    cfg = from_dict(PrepareConfig, load_file(config_file)) if config_file else PrepareConfig()
    if inputs:
        cfg.inputs = [str(p) for p in inputs]
    if not cfg.inputs:
        from .corpora import CORPORA, fetch

        corpus = CORPORA["shakespeare"]
        cfg.inputs = [str(fetch(corpus.name, quiet=True))]
        apply_overrides(cfg, corpus.prepare_defaults)
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def validate(cfg: PrepareConfig) -> None:
    d = cfg.dedup
    if not 0 < d.threshold < 1:
        raise ValueError(f"dedup.threshold must be in (0, 1), got {d.threshold}")
    if not 0 < d.fn_weight < 1:
        raise ValueError(f"dedup.fn_weight must be in (0, 1), got {d.fn_weight}")
    if d.shingle_size < 1 or d.num_perm < 2:
        raise ValueError("dedup.shingle_size must be >= 1 and dedup.num_perm >= 2")
    if (d.bands or d.rows) and d.bands * d.rows > d.num_perm:
        raise ValueError(f"dedup.bands * dedup.rows = {d.bands * d.rows} exceeds dedup.num_perm = {d.num_perm}")
    sc = cfg.shards
    for name in ("val_fraction", "test_fraction"):
        if not 0 <= getattr(sc, name) < 1:
            raise ValueError(f"shards.{name} must be in [0, 1), got {getattr(sc, name)}")
    if sc.val_fraction + sc.test_fraction >= 1:
        raise ValueError(f"shards.val_fraction + shards.test_fraction must be < 1, got "
                         f"{sc.val_fraction} + {sc.test_fraction}")
    both = sorted(set(sc.val_docs) & set(sc.test_docs))
    if both:
        raise ValueError(f"shards.val_docs and shards.test_docs must be disjoint; both name {both[:5]}")
    if cfg.decontam.heldout not in ("flag", "drop", "off"):
        raise ValueError(f"decontam.heldout must be 'flag', 'drop' or 'off', got {cfg.decontam.heldout!r}")
    if cfg.shards.shard_tokens < 1024:
        raise ValueError(f"shards.shard_tokens must be >= 1024, got {cfg.shards.shard_tokens}")
    if cfg.decontam.action not in ("drop", "flag"):
        raise ValueError(f"decontam.action must be 'drop' or 'flag', got {cfg.decontam.action!r}")
    if cfg.utf8_errors not in ("replace", "skip"):
        raise ValueError(f"utf8_errors must be 'replace' or 'skip', got {cfg.utf8_errors!r}")


# ---- step 1: documents ---------------------------------------------------------------------

_W: dict = {}  # per-worker state: config, MinHasher, Decontaminator


def _init_worker(cfg_dict: dict, grams: np.ndarray | None):
    cfg = from_dict(PrepareConfig, cfg_dict)
    _W["cfg"] = cfg
    _W["mh"] = MinHasher(cfg.dedup.shingle_size, cfg.dedup.num_perm, cfg.dedup.seed)
    if grams is not None:
        dc = Decontaminator([], cfg.decontam.ngram)
        dc.grams = grams
        _W["dc"] = dc
    else:
        _W["dc"] = None


def _example(doc_id: str, text: str, value=None) -> dict:
    ex = {"id": doc_id, "snippet": text[:160]}
    if value is not None:
        ex["value"] = round(float(value), 4)
    return ex


def _process_chunk(index: int, docs: list[tuple[str, str, str]], work: str, digest: str) -> dict:
    """Clean, filter, scrub and fingerprint one chunk; write its files; return its tallies."""
    cfg: PrepareConfig = _W["cfg"]
    mh: MinHasher = _W["mh"]
    dc: Decontaminator | None = _W["dc"]
    s = {"index": index, "digest": digest, "docs_in": 0, "bytes_in": 0, "docs_out": 0, "bytes_out": 0,
         "clean": {}, "emptied": {"docs": 0, "bytes": 0, "examples": []}, "filters": {}, "pii": {},
         "pii_docs": 0, "c4_lines_removed": 0,
         "decontam": {"docs": 0, "bytes": 0, "ngrams": 0, "examples": []}}
    kept_meta, exact, sigs = [], [], []
    base = Path(work) / f"chunk-{index:05d}"
    with atomic_open(base.with_suffix(".jsonl"), "w") as out:
        for doc_id, source, raw in docs:
            nbytes = len(raw.encode("utf-8", "surrogatepass"))
            s["docs_in"] += 1
            s["bytes_in"] += nbytes
            text = clean_text(raw, cfg.clean, s["clean"])
            if not text.strip():
                s["emptied"]["docs"] += 1
                s["emptied"]["bytes"] += nbytes
                if len(s["emptied"]["examples"]) < MAX_EXAMPLES:
                    s["emptied"]["examples"].append(_example(doc_id, raw))
                continue
            text, rule, value, c4_removed = apply_filters(text, cfg.filters)
            s["c4_lines_removed"] += c4_removed
            if text is None:
                f = s["filters"].setdefault(rule, {"docs": 0, "bytes": 0, "examples": []})
                f["docs"] += 1
                f["bytes"] += nbytes
                if len(f["examples"]) < MAX_EXAMPLES:
                    f["examples"].append(_example(doc_id, raw, value))
                continue
            if cfg.pii:
                before = sum(s["pii"].values())
                text = scrub(text, s["pii"])
                s["pii_docs"] += sum(s["pii"].values()) > before
            if dc is not None:
                hits = dc.overlap(text)
                if hits:
                    d = s["decontam"]
                    d["docs"] += 1
                    d["bytes"] += nbytes
                    d["ngrams"] += hits
                    if len(d["examples"]) < MAX_EXAMPLES:
                        d["examples"].append(_example(doc_id, text, hits))
                    if cfg.decontam.action == "drop":
                        continue
            out_bytes = len(text.encode("utf-8", "surrogatepass"))
            s["docs_out"] += 1
            s["bytes_out"] += out_bytes
            out.write(json.dumps({"id": doc_id, "source": source, "text": text}, ensure_ascii=False) + "\n")
            kept_meta.append([doc_id, source, out_bytes])
            if cfg.dedup.exact:
                exact.append(np.frombuffer(exact_key(text), dtype=np.uint8))
            if cfg.dedup.near:
                sigs.append(mh.words(words_of(text)))
    n = len(kept_meta)
    with atomic_open(base.with_suffix(".exact.npy"), "wb") as f:
        np.save(f, np.stack(exact) if exact else np.zeros((n, 16), dtype=np.uint8))
    with atomic_open(base.with_suffix(".sig.npy"), "wb") as f:
        np.save(f, np.stack(sigs) if sigs else np.zeros((n, cfg.dedup.num_perm), dtype=np.uint32))
    write_json(base.with_suffix(".meta.json"), kept_meta)
    return s


def _chunks(docs, chunk_bytes: int):
    buf, size = [], 0
    for d in docs:
        buf.append((d.id, d.source, d.text))
        size += len(d.text)
        if size >= chunk_bytes:
            yield buf
            buf, size = [], 0
    if buf:
        yield buf


def _chunk_digest(step_key: str, docs) -> str:
    h = hashlib.blake2b(step_key.encode(), digest_size=16)
    for doc_id, source, text in docs:
        h.update(doc_id.encode("utf-8", "surrogatepass") + b"\x00" + source.encode("utf-8", "surrogatepass")
                 + b"\x00" + text.encode("utf-8", "surrogatepass") + b"\x01")
    return h.hexdigest()


def step_documents(cfg: PrepareConfig, work: Path, workers: int, quiet: bool = False) -> list[dict]:
    """Step 1. Returns the per-chunk tallies (from disk for chunks already done)."""
    work.mkdir(parents=True, exist_ok=True)
    step_cfg = {k: v for k, v in asdict(cfg).items() if k not in ("inputs", "shards", "workers")}
    step_cfg["dedup"] = {k: v for k, v in step_cfg["dedup"].items()
                         if k not in ("threshold", "bands", "rows", "fn_weight")}
    step_cfg["decontam"] = {k: v for k, v in step_cfg["decontam"].items() if not k.startswith("heldout")}
    step_key = step_hash(STEP1_VERSION, step_cfg)
    grams = None
    if cfg.decontam.eval_files:
        texts = (d.text for d in iter_documents(cfg.decontam.eval_files, []))
        grams = Decontaminator(texts, cfg.decontam.ngram).grams
    problems: list[Problem] = []
    docs = iter_documents(cfg.inputs, problems, text_field=cfg.text_field, id_field=cfg.id_field,
                          utf8_errors=cfg.utf8_errors)
    total = sum(p.stat().st_size for p in expand_inputs(cfg.inputs))
    summaries: list[dict] = []
    pending: deque = deque()
    bar = step_bar(total, "documents", quiet=quiet)

    def finish(fut, index, chunk_problems, nbytes):
        s = fut.result() if fut is not None else None
        s["problems"] = chunk_problems
        write_json(work / f"chunk-{index:05d}.json", s)  # the chunk's done marker, written last
        summaries.append(s)
        bar.update(nbytes)

    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(asdict(cfg), grams)) as ex:
        try:
            for index, chunk in enumerate(_chunks(docs, cfg.chunk_bytes)):
                chunk_problems = [p.as_dict() for p in problems]
                problems.clear()
                digest = _chunk_digest(step_key, chunk)
                nbytes = sum(len(t) for _, _, t in chunk)
                done = work / f"chunk-{index:05d}.json"
                if done.exists():
                    try:
                        old = json.loads(done.read_text())
                    except ValueError:
                        old = {}
                    if old.get("digest") == digest and all(
                            (work / f"chunk-{index:05d}{suf}").exists()
                            for suf in (".jsonl", ".sig.npy", ".exact.npy", ".meta.json")):
                        while pending:  # keep the summaries in stream order
                            finish(*pending.popleft())
                        summaries.append(old)
                        bar.update(nbytes)
                        continue
                    done.unlink()
                pending.append((ex.submit(_process_chunk, index, chunk, str(work), digest), index,
                                chunk_problems, nbytes))
                del chunk
                while pending and (len(pending) >= 2 * workers or pending[0][0].done()):
                    finish(*pending.popleft())
            while pending:
                finish(*pending.popleft())
        except BaseException:
            # interrupted: keep every chunk that did finish, in order, so a rerun skips it
            while pending and pending[0][0].done() and pending[0][0].exception() is None:
                finish(*pending.popleft())
            for fut, *_ in pending:
                fut.cancel()
            raise
    bar.close()
    if problems:  # problems after the last document (an empty file at the end, a truncated tail)
        if summaries:
            summaries[-1].setdefault("problems", []).extend(p.as_dict() for p in problems)
            write_json(work / f"chunk-{len(summaries) - 1:05d}.json", summaries[-1])
        else:
            summaries.append({"index": -1, "digest": "", "docs_in": 0, "bytes_in": 0, "docs_out": 0,
                              "bytes_out": 0, "problems": [p.as_dict() for p in problems]})
    for stale in work.glob("chunk-*.json"):  # chunks from an earlier, longer input
        try:
            idx = int(stale.name[6:11])
        except ValueError:
            continue
        if idx >= len([s for s in summaries if s["index"] >= 0]):
            stale.unlink()
    if not any(s.get("docs_out") for s in summaries):
        n_in = sum(s.get("docs_in", 0) for s in summaries)
        raise ValueError(f"no documents left after cleaning and filtering ({n_in} read from "
                         f"{', '.join(cfg.inputs)}); see the problems and filter counts above")
    return summaries


# ---- step 2: dedup and split ---------------------------------------------------------------

def step_dedup(cfg: PrepareConfig, work: Path, summaries: list[dict], quiet: bool = False) -> dict:
    chunks = [s for s in summaries if s["index"] >= 0]
    d = cfg.dedup
    bands, rows = (d.bands, d.rows) if d.bands and d.rows else \
        lsh_params(d.threshold, d.num_perm, fp_weight=1 - d.fn_weight, fn_weight=d.fn_weight)
    key = step_hash("dedup", 2, [s["digest"] for s in chunks], asdict(d), asdict(cfg.shards), bands, rows,
                cfg.decontam.ngram, cfg.decontam.heldout, cfg.decontam.heldout_max_grams)
    out_path = work / "dedup.json"
    if out_path.exists():
        try:
            old = json.loads(out_path.read_text())
            if old.get("key") == key:
                return old
        except ValueError:
            pass
    t0 = time.perf_counter()
    # a few bytes per document in memory: band keys, exact keys, a validation score;
    # ids and signatures stay on disk and are read for the documents that need them
    sig_files, offsets = [], [0]
    for s in chunks:
        sig_files.append(np.load(work / f"chunk-{s['index']:05d}.sig.npy", mmap_mode="r"))
        offsets.append(offsets[-1] + sig_files[-1].shape[0])
    n = offsets[-1]
    offsets_arr = np.array(offsets)
    meta_cache: dict[int, list] = {}

    def meta(i: int) -> list:
        c = int(np.searchsorted(offsets_arr, i, side="right")) - 1
        if c not in meta_cache:
            if len(meta_cache) > 64:
                meta_cache.clear()
            meta_cache[c] = json.loads((work / f"chunk-{chunks[c]['index']:05d}.meta.json").read_text())
        return meta_cache[c][i - offsets[c]]

    def sig_rows(idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        which = np.searchsorted(offsets_arr, idx, side="right") - 1
        out = np.empty((len(idx), d.num_perm), dtype=np.uint32)
        for c in np.unique(which):
            m = which == c
            out[m] = sig_files[c][idx[m] - offsets_arr[c]]
        return out

    sc = cfg.shards
    # one pass over the ids: bytes per document (for byte fractions) and where the
    # explicitly listed held-out documents are
    sizes = np.empty(n, dtype=np.int64)
    listed = {**{i: "val" for i in sc.val_docs}, **{i: "test" for i in sc.test_docs}}
    held_of: dict[int, str] = {}  # document index -> "val" / "test", for the listed ids
    for c, s in enumerate(chunks):
        ms = json.loads((work / f"chunk-{s['index']:05d}.meta.json").read_text())
        sizes[offsets[c]:offsets[c + 1]] = [m[2] for m in ms]
        if listed:
            for j, m in enumerate(ms):
                if m[0] in listed:
                    held_of[offsets[c] + j] = listed[m[0]]
    why_gone: dict[int, str] = {}  # listed documents removed as duplicates, and why

    def pick_kept(members: list[int], what: str) -> int:
        """The member a cluster keeps: a listed held-out document if there is one (so the held-out
        edition stays and its other editions leave training), else the first in the stream."""
        held = [m for m in members if m in held_of]
        if len({held_of[m] for m in held}) > 1:
            v = next(m for m in held if held_of[m] == "val")
            t = next(m for m in held if held_of[m] == "test")
            raise ValueError(f"shards.val_docs {meta(v)[0]!r} and shards.test_docs {meta(t)[0]!r} are {what} "
                             "of each other: the two held-out splits would share a document")
        rep = held[0] if held else members[0]
        for m in held[1:]:
            why_gone[m] = f"removed as a {what[:-1]} of {meta(rep)[0]!r}"
        return rep

    alive = np.ones(n, dtype=bool)
    removed_exact: list[dict] = []
    if d.exact and n:
        ex = np.concatenate([np.load(work / f"chunk-{s['index']:05d}.exact.npy") for s in chunks])
        for first, dups in exact_clusters(ex).items():
            members = [first, *dups]
            rep = pick_kept(members, "exact duplicates")
            gone = [m for m in members if m != rep]
            alive[gone] = False
            removed_exact.append({"kept": meta(rep)[0], "removed": [meta(i)[0] for i in gone],
                                  "bytes": int(sum(meta(i)[2] for i in gone))})
        del ex
    near: list[dict] = []
    if d.near and n:
        # read each chunk's signatures once (not through the memory map, whose pages would stay resident)
        keys = np.concatenate([band_keys(np.load(work / f"chunk-{s['index']:05d}.sig.npy"), bands, rows)
                               for s in chunks])
        for rep, members in near_clusters(sig_rows, n, d.threshold, bands, rows, keys=keys, alive=alive):
            new_rep = pick_kept([rep, *[m for m, _ in members]], "near duplicates")
            if new_rep != rep:  # Jaccard against the document that stays
                others = np.array([x for x in [rep, *[m for m, _ in members]] if x != new_rep])
                est = (sig_rows(others) == sig_rows(np.array([new_rep]))).mean(axis=1)
                members, rep = [(int(m), float(j)) for m, j in zip(others, est)], new_rep
            alive[[m for m, _ in members]] = False
            near.append({"kept": meta(rep)[0], "kept_source": meta(rep)[1],
                         "removed": [{"id": meta(m)[0], "source": meta(m)[1], "jaccard": round(j, 4)}
                                     for m, j in members],
                         "bytes": int(sum(meta(m)[2] for m, _ in members))})
        del keys
    kept = np.flatnonzero(alive)
    # held-out splits: whole documents, listed by id or chosen by a seeded hash of their id
    # (stable when other documents come and go) until they hold about their share of the bytes
    kept_bytes = int(sizes[kept].sum())
    splits: dict[str, list[int]] = {}
    for name, ids in (("val", sc.val_docs), ("test", sc.test_docs)):
        if not ids:
            continue
        mine = sorted(i for i, sp in held_of.items() if sp == name and alive[i])
        missing = set(ids) - {meta(i)[0] for i in mine}
        if missing:
            gone = {meta(i)[0]: why_gone.get(i, "removed as a duplicate or by the cleaning/filter step")
                    for i, sp in held_of.items() if sp == name and not alive[i]}
            detail = "; ".join(f"{m!r}: {gone.get(m, 'no document has this id')}" for m in sorted(missing)[:5])
            raise ValueError(f"shards.{name}_docs: not among the kept documents: {detail}")
        splits[name] = mine
    hashed = [name for name, ids in (("val", sc.val_docs), ("test", sc.test_docs)) if not ids
              and getattr(sc, f"{name}_fraction") > 0]
    if hashed:
        score = np.empty(n, dtype=np.uint64)
        for c, s in enumerate(chunks):
            ids = json.loads((work / f"chunk-{s['index']:05d}.meta.json").read_text())
            score[offsets[c]:offsets[c + 1]] = [
                int.from_bytes(hashlib.blake2b(f"{sc.seed}:{m[0]}".encode(), digest_size=8).digest(), "big")
                for m in ids]
        order = kept[np.argsort(score[kept], kind="stable")]
        taken = {i for v in splits.values() for i in v}
        for name in hashed:  # validation first: a training run needs it most
            target = getattr(sc, f"{name}_fraction") * kept_bytes
            chosen, got = [], 0
            room = len(kept) - len(taken) - 1  # leave at least one training document
            for i in order:
                if got >= target or len(chosen) >= room:
                    break
                i = int(i)
                # take a document when it brings the split closer to its share of the bytes
                if i not in taken and sizes[i] < 2 * (target - got):
                    chosen.append(i)
                    got += int(sizes[i])
            if not chosen and room > 0:  # the floor: one document, the smallest (first by hash among equals)
                chosen = [min((int(i) for i in order if int(i) not in taken), key=lambda i: sizes[i])]
            splits[name] = sorted(chosen)
            taken.update(chosen)
    val, test = splits.get("val", []), splits.get("test", [])
    overlap = heldout_overlap(cfg, work, summaries, alive, set(val), set(test), meta) \
        if cfg.decontam.heldout != "off" and (val or test) else {}
    dropped = overlap.pop("drop", [])
    if dropped:
        alive[dropped] = False
    result = {"key": key, "documents": int(n), "kept": int(alive.sum()), "bands": bands, "rows": rows,
              "exact_clusters": removed_exact, "near_clusters": near,
              "removed": [int(i) for i in np.flatnonzero(~alive)], "val": val, "test": test,
              "val_ids": [meta(i)[0] for i in val], "test_ids": [meta(i)[0] for i in test],
              "heldout_bytes": {"kept": kept_bytes, "val": int(sizes[val].sum()), "test": int(sizes[test].sum())},
              "heldout_overlap": overlap, "seconds": round(time.perf_counter() - t0, 3)}
    write_json(out_path, result)
    return result


def heldout_overlap(cfg: PrepareConfig, work: Path, summaries: list[dict], alive: np.ndarray,
                    val: set[int], test: set[int], meta) -> dict:
    """Long shared passages between the splits: every ``decontam.ngram``-word n-gram (lowercased
    ``\\w+`` words, as in ``Decontaminator``) that a training document shares with a validation or
    test document, and those a validation document shares with a test one. Returns, per pair of
    splits, the documents involved, the n-gram counts and the shared passages (runs of overlapping
    n-grams, as words); with ``decontam.heldout = "drop"`` also ``"drop"``, the training documents
    to remove. Memory: the held-out n-grams (12 bytes each), about ``heldout_max_grams`` of them at
    most; beyond that a fixed hash-sample of n-grams (the same on both sides) is compared, which
    still finds a shared passage of L n-grams with probability 1 - (1 - rate)^L."""
    from .filters import _NGRAM_RE, _ngram_hashes
    from .shards import _iter_kept

    n = cfg.decontam.ngram
    dc = cfg.decontam
    # the n-grams of the held-out documents, in one pass; beyond heldout_max_grams (estimated from
    # their bytes, at most one word per 4 bytes) a fixed hash-sample of them, the same on both sides
    est = sum(int(meta(g)[2]) for g in (*val, *test)) // 4
    keep_below = None if est <= dc.heldout_max_grams else np.uint64(int((1 << 64) * dc.heldout_max_grams / est) - 1)

    def doc_grams(text: str):
        words = _NGRAM_RE.findall(text.lower())
        if len(words) < n:
            return words, np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int64)
        h = _ngram_hashes(hash_words(words), n)
        if keep_below is None:
            return words, h, np.arange(len(h))
        with np.errstate(over="ignore"):
            pos = np.flatnonzero((h * np.uint64(0x9E3779B97F4A7C15)) < keep_below)
        return words, h[pos], pos

    grams: dict[str, list] = {"val": [], "test": []}
    owners: dict[str, list] = {"val": [], "test": []}
    names: list[int] = []  # owner number -> document index
    for g, doc_id, _src, text in _iter_kept(work, summaries, 0):
        split = "val" if g in val else "test" if g in test else None
        if split:
            _, h, _ = doc_grams(text)
            grams[split].append(h)
            owners[split].append(np.full(len(h), len(names), dtype=np.int32))
            names.append(g)
    total = sum(len(h) for v in grams.values() for h in v)
    tables = {}
    for split in ("val", "test"):
        if grams[split]:
            h, o = np.concatenate(grams[split]), np.concatenate(owners[split])
            grams[split] = owners[split] = None
            order = np.argsort(h, kind="stable")
            tables[split] = (h[order], o[order])
            del h, o, order
    found: dict[str, dict] = {}
    drop: set[int] = set()
    for g, doc_id, _src, text in _iter_kept(work, summaries, 0):
        if not alive[g] or g in test:
            continue
        against = ("test",) if g in val else ("val", "test")
        words, h, at = doc_grams(text)
        if not len(h):
            continue
        for split in against:
            if split not in tables:
                continue
            th, to = tables[split]
            where = np.minimum(np.searchsorted(th, h), len(th) - 1)  # th is sorted: binary search
            hit = th[where] == h
            pos = at[hit]  # word positions where a shared n-gram starts
            if not len(pos):
                continue
            where = where[hit]
            pair = f"{split}-vs-{'val' if g in val else 'train'}"
            rec = found.setdefault(pair, {"documents": 0, "ngrams": 0, "pairs": []})
            rec["documents"] += 1
            rec["ngrams"] += len(pos)
            # which held-out documents, and the passages: runs of consecutive shared n-grams
            by_owner: dict[int, int] = {}
            for w in where:
                o = names[int(to[w])]
                by_owner[o] = by_owner.get(o, 0) + 1
            runs, start = [], int(pos[0])
            for a, b in zip(pos[:-1], pos[1:]):
                if b != a + 1:
                    runs.append((start, int(a) + n))
                    start = int(b)
            runs.append((start, int(pos[-1]) + n))
            runs.sort(key=lambda r: r[0] - r[1])
            for o, cnt in sorted(by_owner.items(), key=lambda kv: -kv[1]):
                rec["pairs"].append({"heldout": meta(o)[0], "other": doc_id, "ngrams": cnt,
                                     "passages": len(runs),
                                     "examples": [" ".join(words[s:e])[:200] for s, e in runs[:MAX_EXAMPLES]]})
            if dc.heldout == "drop" and g not in val:
                drop.add(g)
    for rec in found.values():
        rec["pairs"].sort(key=lambda p: -p["ngrams"])
        del rec["pairs"][50:]
    out = {"ngram": n, "action": dc.heldout, "sampled": keep_below is not None,
           "heldout_ngrams": int(total), **found}  # heldout_ngrams: those compared (after any sampling)
    if drop:
        out["drop"] = sorted(drop)
        out["dropped"] = [meta(i)[0] for i in sorted(drop)]
    return out


# ---- the whole chain ----------------------------------------------------------------------

def clean_and_dedup(cfg: PrepareConfig, out: str | os.PathLike, quiet: bool = False) -> tuple[list, dict]:
    """Steps 1 and 2 only (no tokenizer needed): returns (chunk tallies, dedup result)."""
    validate(cfg)
    work = Path(out) / "work"
    summaries = step_documents(cfg, work, cfg.workers or os.cpu_count() or 1, quiet)
    return summaries, step_dedup(cfg, work, summaries, quiet)


def train_texts(out: str | os.PathLike, summaries: list, dedup: dict):
    """The texts of the kept training documents (not removed, not validation or test), in input
    order: what a tokenizer for this data should be trained on."""
    from .shards import _iter_kept

    skip = set(dedup["removed"]) | set(dedup["val"]) | set(dedup.get("test", []))
    for g, _id, _src, text in _iter_kept(Path(out) / "work", summaries, 0):
        if g not in skip:
            yield text


def check_tokenizer(cfg: PrepareConfig, tokenizer: str | os.PathLike):
    """Open the tokenizer step 3 will use and resolve its document token, so that a missing or
    invalid tokenizer fails before the corpus is read (steps 1-2 can take hours). Returns it."""
    from ..tokenize import load
    from .shards import resolve_doc_token, tokenizer_file

    path = tokenizer_file(tokenizer)
    try:
        tok = load(path)
    except (ValueError, KeyError, TypeError) as e:
        msg = str(e)
        raise ValueError(msg if str(path) in msg else f"{path}: not a usable tokenizer ({msg})") from None
    resolve_doc_token(tok, cfg.shards.doc_token)
    return tok


def prepare(cfg: PrepareConfig, tokenizer: str | os.PathLike, out: str | os.PathLike, quiet: bool = False) -> dict:
    """Run the three steps; returns the manifest. Reuses or resumes whatever is already in ``out``."""
    from .shards import step_shards

    validate(cfg)
    check_tokenizer(cfg, tokenizer)  # before anything is read or written: a bad path fails at once
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    workers = cfg.workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    summaries = step_documents(cfg, work, workers, quiet)
    t1 = time.perf_counter()
    dedup = step_dedup(cfg, work, summaries, quiet)
    t2 = time.perf_counter()
    manifest = step_shards(cfg, work, out, tokenizer, summaries, dedup, quiet)
    t3 = time.perf_counter()
    report = build_report(cfg, summaries, dedup, manifest, {"documents": t1 - t0, "dedup": t2 - t1,
                                                            "shards": t3 - t2, "total": t3 - t0})
    write_json(out / "report.json", report, indent=1)
    log.debug("%s: documents %.2fs, dedup %.2fs, shards %.2fs (%d workers)", out, t1 - t0, t2 - t1, t3 - t2, workers)
    for rec in report["heldout"].values():
        if "warning" in rec:
            log.warning("%s: %s", out, rec["warning"])
    return manifest


def heldout_summary(cfg: PrepareConfig, dedup: dict, splits: dict) -> dict:
    """Per held-out split: how it was chosen, its documents and share of the kept bytes, and a
    warning when it is too small to measure anything."""
    sc = cfg.shards
    kept = dedup.get("heldout_bytes", {}).get("kept") or sum(sp["bytes"] for sp in splits.values())
    out = {}
    for name in ("val", "test"):
        sp = splits.get(name, {"documents": 0, "bytes": 0, "tokens": 0})
        listed = getattr(sc, f"{name}_docs")
        rec = {"chosen_by": "list" if listed else f"seeded hash (seed {sc.seed}), "
                            f"{getattr(sc, f'{name}_fraction'):.0%} of the bytes",
               "ids": dedup.get(f"{name}_ids", []), "documents": sp["documents"], "bytes": sp["bytes"],
               "tokens": sp["tokens"], "byte_share": round(sp["bytes"] / kept, 6) if kept else 0.0}
        if sp["tokens"] < sc.warn_tokens or sp["documents"] < sc.warn_documents:
            what = "validation" if name == "val" else "test"
            rec["warning"] = (f"the {what} split holds {sp['documents']} document(s), {sp['tokens']:,} tokens "
                              f"(under {sc.warn_documents} documents or {sc.warn_tokens:,} tokens): too small "
                              f"for its loss to measure much; give more data, raise shards.{name}_fraction or "
                              f"list documents in shards.{name}_docs")
        out[name] = rec
    return out


def build_report(cfg, summaries, dedup, manifest, times) -> dict:
    def add(dst: dict, src: dict):
        for k, v in src.items():
            if isinstance(v, dict):
                add(dst.setdefault(k, {}), v)
            elif isinstance(v, list):
                lst = dst.setdefault(k, [])
                lst.extend(v[: MAX_EXAMPLES - len(lst)] if k == "examples" else v)
            elif isinstance(v, (int, float)):
                dst[k] = dst.get(k, 0) + v
        return dst

    tot: dict = {}
    for s in summaries:
        add(tot, {k: v for k, v in s.items() if k not in ("index", "digest")})
    removed_bytes = sum(c["bytes"] for c in dedup["exact_clusters"]) + sum(c["bytes"] for c in dedup["near_clusters"])
    splits = manifest["splits"]
    bytes_in = tot.get("bytes_in", 0)
    return {
        "inputs": cfg.inputs,
        "documents_in": tot.get("docs_in", 0), "bytes_in": bytes_in,
        "problems": tot.get("problems", []),
        "clean": tot.get("clean", {}),
        "emptied_by_cleaning": tot.get("emptied", {"docs": 0, "bytes": 0}),
        "filters": dict(sorted(tot.get("filters", {}).items(), key=lambda kv: -kv[1]["docs"])),
        "c4_lines_removed": tot.get("c4_lines_removed", 0),
        "pii": {"replacements": tot.get("pii", {}), "documents": tot.get("pii_docs", 0)},
        "decontamination": {**tot.get("decontam", {}), "action": cfg.decontam.action,
                            "ngram": cfg.decontam.ngram, "eval_files": cfg.decontam.eval_files},
        "after_filters": {"documents": tot.get("docs_out", 0), "bytes": tot.get("bytes_out", 0)},
        "dedup": {"exact": {"documents": sum(len(c["removed"]) for c in dedup["exact_clusters"]),
                            "bytes": sum(c["bytes"] for c in dedup["exact_clusters"]),
                            "clusters": dedup["exact_clusters"]},
                  "near": {"documents": sum(len(c["removed"]) for c in dedup["near_clusters"]),
                           "bytes": sum(c["bytes"] for c in dedup["near_clusters"]),
                           "clusters": dedup["near_clusters"],
                           "shingle_size": cfg.dedup.shingle_size, "num_perm": cfg.dedup.num_perm,
                           "threshold": cfg.dedup.threshold, "bands": dedup["bands"], "rows": dedup["rows"],
                           "fn_weight": cfg.dedup.fn_weight},
                  "removed_bytes": removed_bytes},
        "output": {name: {k: sp[k] for k in ("documents", "tokens", "bytes")} for name, sp in splits.items()},
        "val_ids": dedup["val_ids"], "test_ids": dedup.get("test_ids", []),
        "heldout": heldout_summary(cfg, dedup, splits),
        "heldout_overlap": dedup.get("heldout_overlap", {}),
        "seconds": {k: round(v, 3) for k, v in times.items()},
        "mb_per_s": round(bytes_in / 1e6 / max(times["total"], 1e-9), 3),
    }
