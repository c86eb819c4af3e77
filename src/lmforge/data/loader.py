"""The loader: memory-mapped shards in, ``(B, T)`` training batches out.

Knows the shard format and how to cut it into rows deterministically; knows
nothing about models (batches are numpy arrays; ``Batch.torch()`` moves them).

Every row has a *global row index*; a batch for step ``s`` on rank ``r`` of
``world_size`` is the rows ``[(s * world_size + r) * B, ... + B)``, so ranks
never overlap and never leave gaps, and the state is just the step number:
``state_dict()`` / ``load_state_dict()`` resume at exactly the next batch, on
any number of ranks that reads the same global rows per step
(``world_size * B``; ``check_global_rows``).

Two ways to cut rows (``T + 1`` tokens; ``x`` = the first ``T``, ``y`` = the last ``T``):

* ``"windows"``: each epoch the split's token stream is cut into windows of
  ``T + 1`` tokens at a random offset (stride ``T``) and the windows are shuffled.
  Every token is used once per epoch; windows ignore document boundaries.
* ``"bos"``: BOS-aligned packing. Each epoch the documents are shuffled; a
  document longer than a row is cut into row-sized pieces; rows are filled
  best-fit from a buffer of pieces so that every row begins at a document's
  start token (or is a full-length piece of a longer document); when nothing
  fits the remaining space, the smallest waiting piece is cropped to fill it.

Both give ``doc_ids``: for each position, the index of the document segment it
belongs to within its row, for attention masks that stop at document
boundaries.

``MixtureLoader`` draws each row from one of several loaders with given weights.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .shards import load_manifest


@dataclass
class Batch:
    x: np.ndarray  # (B, T) int64 inputs
    y: np.ndarray  # (B, T) int64 targets (x shifted by one)
    doc_ids: np.ndarray  # (B, T) int32 document segment index within each row

    def torch(self, device="cpu"):
        import torch

        t = (torch.from_numpy(self.x), torch.from_numpy(self.y), torch.from_numpy(self.doc_ids))
        if str(device) != "cpu":
            t = tuple(v.pin_memory().to(device, non_blocking=True) for v in t)
        return t


class TokenStream:
    """One split of a shard directory as a single memory-mapped token sequence."""

    def __init__(self, path: str | Path, split: str = "train"):
        self.path = Path(path)
        self.manifest = load_manifest(self.path)
        if split not in self.manifest["splits"]:
            has = ", ".join(self.manifest["splits"])
            if split == "test":
                raise ValueError(f"{self.path}: no test split (it has {has}): it was prepared before lmforge held "
                                 "out a test split; rerun `lmforge data prepare` into a new directory to get one")
            raise ValueError(f"{self.path}: no split {split!r} (has {has})")
        sp = self.manifest["splits"][split]
        if not sp["shards"]:
            raise ValueError(f"{self.path}: split {split!r} has no tokens (no document was held out for it; "
                             "see shards.val_fraction / shards.test_fraction or the *_docs lists)")
        dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self.shards, offsets, starts = [], [0], []
        for sh in sp["shards"]:
            f = self.path / sh["file"]
            if not f.exists():
                raise FileNotFoundError(f"{f}: listed in the manifest but missing")
            if f.stat().st_size != sh["tokens"] * dtype.itemsize:
                raise ValueError(f"{f}: {f.stat().st_size} bytes, the manifest says {sh['tokens']} tokens")
            self.shards.append(np.memmap(f, dtype=dtype, mode="r"))
            idx = json.loads((self.path / sh["index"]).read_text())
            starts.append(np.asarray(idx["starts"], dtype=np.int64) + offsets[-1])
            offsets.append(offsets[-1] + sh["tokens"])
        self.offsets = np.array(offsets, dtype=np.int64)
        self.n = int(offsets[-1])
        self.doc_starts = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
        self.split = split
        self.bytes = sp["bytes"]
        self.documents = sp["documents"]

    def __len__(self) -> int:
        return self.n

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` as int64, stitched across shard files."""
        out = np.empty(length, dtype=np.int64)
        k = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pos, done = start, 0
        while done < length:
            lo = pos - self.offsets[k]
            take = min(length - done, int(self.offsets[k + 1] - pos))
            out[done:done + take] = self.shards[k][lo:lo + take]
            done += take
            pos += take
            k += 1
        return out

    def doc_lengths(self) -> tuple[np.ndarray, np.ndarray]:
        ends = np.r_[self.doc_starts[1:], self.n]
        return self.doc_starts, ends - self.doc_starts


def check_global_rows(state: dict, batch_size: int, world_size: int) -> None:
    """A loader state saved at ``world_size`` W x ``batch_size`` B rows per step loads into a loader of
    ``batch_size`` B' on W' ranks only when W * B == W' * B'; a ValueError naming both otherwise."""
    B = int(state.get("batch_size", batch_size))
    W = int(state.get("world_size", 1 if "batch_size" in state else world_size))
    if B * W != batch_size * world_size:
        raise ValueError(f"loader state was saved with world_size={W} x batch_size={B} = {W * B} rows per step, "
                         f"this run reads world_size={world_size} x batch_size={batch_size} = "
                         f"{world_size * batch_size}: a resume needs the same global rows per step (set "
                         f"batch_size = {W * B} / (data-parallel ranks), or global_batch_size = "
                         f"{W * B} x grad_accum)")


class ShardLoader:
    """Deterministic, resumable, rank-sharded batches from one shard directory."""

    def __init__(self, path: str | Path, split: str = "train", batch_size: int = 8, seq_len: int = 256,
                 mode: str = "windows", seed: int = 0, rank: int = 0, world_size: int = 1,
                 bos_buffer: int = 64):
        if mode not in ("windows", "bos"):
            raise ValueError(f"mode must be 'windows' or 'bos', got {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1 or seq_len < 1:
            raise ValueError("batch_size and seq_len must be >= 1")
        self.stream = TokenStream(path, split)
        self.B, self.T, self.mode, self.seed = batch_size, seq_len, mode, seed
        self.rank, self.world_size = rank, world_size
        self.bos_buffer = bos_buffer
        self.step = 0
        if mode == "windows":
            self.rows_per_epoch = (self.stream.n - self.T - 1) // self.T
        else:
            self.rows_per_epoch = None  # depends on the epoch's packing
        if mode == "windows" and self.rows_per_epoch < 1:
            raise ValueError(f"split {split!r} has {self.stream.n} tokens, fewer than one row of {seq_len + 1}")
        self._epoch_cache: dict[int, object] = {}
        self._cum_rows = [0]  # bos mode: rows before each epoch

    # ---- state ----
    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "mode": self.mode, "batch_size": self.B, "seq_len": self.T,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Resume at the state's step. The state may come from another world size: a loader saved by
        ``world_size`` W ranks of ``batch_size`` B resumes on W' ranks of B' when W * B == W' * B' (the
        same global rows per step, so step s covers the same rows); anything else is refused."""
        for k in ("seed", "mode", "seq_len"):
            mine = {"seed": self.seed, "mode": self.mode, "seq_len": self.T}[k]
            if k in state and state[k] != mine:
                raise ValueError(f"loader state has {k}={state[k]!r} but this loader has {mine!r}")
        check_global_rows(state, self.B, self.world_size)
        self.step = int(state["step"])

    # ---- rows ----
    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch])

    def _windows_epoch(self, epoch: int):
        plan = self._epoch_cache.get(epoch)
        if plan is None:
            rng = self._rng(epoch)
            offset = int(rng.integers(self.T))
            perm = rng.permutation(self.rows_per_epoch)
            plan = (offset, perm)
            self._epoch_cache = {epoch: plan}
        return plan

    def _bos_epoch(self, epoch: int):
        plan = self._epoch_cache.get(epoch)
        if plan is None:
            plan = pack_bos(*self.stream.doc_lengths(), self.T + 1, self._rng(epoch), self.bos_buffer)
            if plan[0][-1] == 0:
                raise ValueError(f"split {self.stream.split!r} is too small for one row of {self.T + 1} tokens")
            self._epoch_cache = {epoch: plan}
        return plan

    def _locate_bos(self, g: int) -> tuple[int, int]:
        while len(self._cum_rows) <= 1 or self._cum_rows[-1] <= g:
            e = len(self._cum_rows) - 1
            row_ptr = self._bos_epoch(e)[0]
            self._cum_rows.append(self._cum_rows[-1] + len(row_ptr) - 1)
        e = int(np.searchsorted(self._cum_rows, g, side="right")) - 1
        return e, g - self._cum_rows[e]

    def row(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        """Global row ``g``: (T + 1 tokens, T + 1 document-segment ids)."""
        L = self.T + 1
        if self.mode == "windows":
            epoch, i = divmod(g, self.rows_per_epoch)
            offset, perm = self._windows_epoch(epoch)
            start = offset + int(perm[i]) * self.T
            toks = self.stream.read(start, L)
            ds = self.stream.doc_starts
            seg = np.searchsorted(ds, np.arange(start, start + L), side="right")
            return toks, (seg - seg[0]).astype(np.int32)
        epoch, i = self._locate_bos(g)
        row_ptr, seg_start, seg_len = self._bos_epoch(epoch)
        parts, segs = [], []
        for j, k in enumerate(range(row_ptr[i], row_ptr[i + 1])):
            parts.append(self.stream.read(int(seg_start[k]), int(seg_len[k])))
            segs.append(np.full(int(seg_len[k]), j, dtype=np.int32))
        return np.concatenate(parts), np.concatenate(segs)

    def rows(self, gs) -> Batch:
        toks, segs = zip(*(self.row(int(g)) for g in gs))
        t = np.stack(toks)
        s = np.stack(segs)
        return Batch(t[:, :-1], t[:, 1:], s[:, :-1])

    def batch_rows(self, step: int) -> np.ndarray:
        first = (step * self.world_size + self.rank) * self.B
        return np.arange(first, first + self.B)

    def next(self) -> Batch:
        b = self.rows(self.batch_rows(self.step))
        self.step += 1
        return b

    def __iter__(self):
        while True:
            yield self.next()


def pack_bos(starts: np.ndarray, lengths: np.ndarray, L: int, rng: np.random.Generator, buffer: int = 64):
    """Best-fit packing of shuffled documents into rows of ``L`` tokens.

    Returns ``(row_ptr, seg_start, seg_len)``: row ``i`` is the segments
    ``row_ptr[i]:row_ptr[i+1]``. The tail that does not fill a last row is dropped.
    """
    order = rng.permutation(len(starts))
    pieces: list[tuple[int, int]] = []  # (start, length) in shuffled document order
    for d in order:
        s, n = int(starts[d]), int(lengths[d])
        while n > 0:
            take = min(n, L)
            pieces.append((s, take))
            s += take
            n -= take
    row_ptr, seg_start, seg_len = [0], [], []
    waiting: list[tuple[int, int]] = []
    nxt = 0
    while True:
        while len(waiting) < buffer and nxt < len(pieces):
            waiting.append(pieces[nxt])
            nxt += 1
        if not waiting or (nxt >= len(pieces) and sum(p[1] for p in waiting) < L):
            break
        room = L
        while room > 0 and waiting:
            best = -1
            for j, (_, n) in enumerate(waiting):  # the largest piece that fits
                if n <= room and (best < 0 or n > waiting[best][1]):
                    best = j
            if best < 0:  # nothing fits: crop the smallest to fill the row
                best = min(range(len(waiting)), key=lambda j: waiting[j][1])
                s, _ = waiting.pop(best)
                seg_start.append(s)
                seg_len.append(room)
                room = 0
                break
            s, n = waiting.pop(best)
            seg_start.append(s)
            seg_len.append(n)
            room -= n
            if len(waiting) < buffer and nxt < len(pieces):
                waiting.append(pieces[nxt])
                nxt += 1
        if room:
            del seg_start[row_ptr[-1]:]
            del seg_len[row_ptr[-1]:]
            break
        row_ptr.append(len(seg_start))
    return np.array(row_ptr, dtype=np.int64), np.array(seg_start, dtype=np.int64), np.array(seg_len, dtype=np.int64)


class MixtureLoader:
    """Rows drawn from several loaders with weights; deterministic and rank-sharded.

    For step ``s`` the source of each of the ``B * world_size`` global rows is drawn
    from ``rng(seed, s)``; each source hands out its own rows in order, so the
    state is the step and one cursor per source."""

    def __init__(self, loaders: list[ShardLoader], weights: list[float], seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if len(loaders) != len(weights) or not loaders:
            raise ValueError("give one weight per loader")
        w = np.asarray(weights, dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
        self.p = w / w.sum()
        T = {ld.T for ld in loaders}
        B = {ld.B for ld in loaders}
        if len(T) != 1 or len(B) != 1:
            raise ValueError("every loader in a mixture needs the same batch_size and seq_len")
        self.loaders, self.seed, self.rank, self.world_size = loaders, seed, rank, world_size
        self.B, self.T = B.pop(), T.pop()
        self.step = 0
        self.cursors = [0] * len(loaders)

    def state_dict(self) -> dict:
        return {"step": self.step, "cursors": list(self.cursors), "seed": self.seed, "batch_size": self.B,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """As ``ShardLoader.load_state_dict``: a state from W ranks of B rows resumes on W' ranks of B'
        when W * B == W' * B' (each step draws the same global rows; the cursors count global rows)."""
        if "seed" in state and state["seed"] != self.seed:
            raise ValueError(f"mixture loader state has seed={state['seed']!r} but this loader has {self.seed!r}")
        if len(state["cursors"]) != len(self.loaders):
            raise ValueError(f"mixture loader state has {len(state['cursors'])} sources, this loader "
                             f"{len(self.loaders)}")
        if "batch_size" in state:
            check_global_rows(state, self.B, self.world_size)
        self.step = int(state["step"])
        self.cursors = [int(c) for c in state["cursors"]]

    def next(self) -> Batch:
        n = self.B * self.world_size
        src = np.random.default_rng([self.seed, self.step]).choice(len(self.loaders), size=n, p=self.p)
        rows = []
        counters = list(self.cursors)
        for j, s in enumerate(src):
            if self.rank * self.B <= j < (self.rank + 1) * self.B:
                rows.append(self.loaders[s].row(counters[s]))
            counters[s] += 1
        self.cursors = counters
        self.step += 1
        toks = np.stack([r[0] for r in rows])
        segs = np.stack([r[1] for r in rows])
        return Batch(toks[:, :-1], toks[:, 1:], segs[:, :-1])

    def __iter__(self):
        while True:
            yield self.next()
