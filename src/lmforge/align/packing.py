"""SFT's tokens: conversations to examples, examples to rows, rows to the loss.

Knows the chat format's output (``lmforge.tokenize.chat.render``: ids and an assistant-only mask that
includes each closing ``<|end|>``), how over-long conversations are cut or skipped, best-fit-decreasing
packing, the four row layouts, the SFT loss (per trained token or per conversation) and NEFTune
noise. Knows nothing about files, the optimizer or the training loop (it hands the loop
``lmforge.train.loop.Batch`` objects and a loss; the loop owns steps, accumulation and checkpoints).

Shifting happens inside each example: position t of an example is trained to predict ids[t+1] when
mask[t+1] is set, and an example's last position predicts nothing, so a packed row never asks one
conversation to predict the next one's first token.

Row layouts (``SFTBatches(mode=...)``), all giving the same per-conversation loss:

* ``"bfd"``: rows of ``seq_len`` tokens, each holding the conversations one best-fit-decreasing bin
  holds; ``doc_ids`` keep attention inside a conversation, ``position_ids`` restart at 0 for each.
* ``"none"``: one conversation per row, right-padded to the batch's longest (``attention_mask`` 0 on
  the padding).
* ``"padding_free"``: a micro-batch's conversations concatenated into one row ``(1, sum of lengths)``,
  with ``doc_ids``/``position_ids`` as in ``"bfd"``.
* ``"grouped"``: rows as ``"none"``, but each micro-batch holds conversations of similar length (the
  epoch's order cut into spans of ``GROUP_SPAN`` micro-batches, each span sorted by length, the
  micro-batches then shuffled): almost no padding and plain causal attention, the fastest layout on a
  CPU. (Measured, the demo model (4 x 96, V 2048), 1 thread, conversations of 72 tokens on average,
  forward + backward: grouped B16 3.5k trained tokens/s, bfd B4 (rows of 256) 3.0k, padding_free B4
  2.3k, none B16 2.1k: the masks cost the fast causal kernel, padding costs its share.)

When every row holds one conversation from position 0 (``"none"``, ``"grouped"``, a batch of one-
conversation ``"bfd"`` rows) the loss calls the model without masks or positions: causal attention
never reaches right padding, so the result is the same and the fast causal kernel applies. The loss
computes the head's logits only at trained positions.

Padding has ``doc_ids`` -1, ``position_ids`` 0, ``attention_mask`` 0 and targets -100. ``doc_ids``
number the conversations of a micro-batch 0..k-1 across all its rows (distinct per conversation).
"""
from __future__ import annotations

import bisect
import math
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = -100
MODES = ("bfd", "none", "padding_free", "grouped")
GROUP_SPAN = 64  # "grouped": conversations are sorted by length within spans of GROUP_SPAN micro-batches
NORMS = ("token", "conversation")
TRUNCATION = ("truncate", "skip")

try:  # the shared loop's batch type (h18-loop); a stand-in with the same fields until it lands
    from lmforge.train.loop import Batch
except ImportError:  # pragma: no cover - depends on the branch
    @dataclass
    class Batch:
        inputs: dict
        n: int
        tokens: int
        trained: int = 0


@dataclass
class Example:
    """One rendered conversation: ``ids`` (L,) int64, ``mask`` (L,) int8 (1 on tokens the model must
    produce), ``id`` where it came from."""
    ids: np.ndarray
    mask: np.ndarray
    id: str

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def trained(self) -> int:
        """Tokens that carry loss: masked tokens after the first (position 0 has no predecessor)."""
        return int(self.mask[1:].sum())

    def targets(self) -> np.ndarray:
        """(L,) int64: ids[t+1] where mask[t+1], else -100; the last position -100."""
        t = np.full(len(self.ids), IGNORE, dtype=np.int64)
        t[:-1] = np.where(self.mask[1:] != 0, self.ids[1:], IGNORE)
        return t


# ---- encoding ----

def encode(tok, convs, max_len: int, truncation: str = "truncate") -> tuple[list[Example], dict]:
    """Render conversations (``{"messages": [...], "id": ...}`` dicts, or bare message lists) with
    ``chat.render``. Longer than ``max_len``: ``"truncate"`` keeps the first ``max_len`` tokens,
    ``"skip"`` drops it; a conversation with no trained token (left) is skipped. Returns the examples
    and ``{"conversations", "truncated", "skipped", "tokens", "trained_tokens"}`` (plus
    ``"skipped_long"``/``"skipped_untrained"``, the two kinds of skip)."""
    from lmforge.tokenize.chat import render

    if truncation not in TRUNCATION:
        raise ValueError(f"truncation: expected one of {TRUNCATION}, got {truncation!r}")
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 2:
        raise ValueError(f"max_len: expected an int >= 2, got {max_len!r}")
    out: list[Example] = []
    st = {"conversations": 0, "truncated": 0, "skipped": 0, "tokens": 0, "trained_tokens": 0,
          "skipped_long": 0, "skipped_untrained": 0}
    for k, c in enumerate(convs):
        if isinstance(c, dict):
            if "messages" not in c:
                raise ValueError(f"conversation {c.get('id', k)}: no 'messages' field (keys: {sorted(c)})")
            messages, cid = c["messages"], str(c.get("id", k))
        elif isinstance(c, (list, tuple)):
            messages, cid = c, str(k)
        else:
            raise ValueError(f"conversation {k}: expected a dict with 'messages' or a list of messages, "
                             f"got {type(c).__name__}")
        st["conversations"] += 1
        try:
            ids, mask = render(tok, messages)
        except ValueError as e:
            raise ValueError(f"conversation {cid}: {e}") from None
        if len(ids) > max_len:
            if truncation == "skip":
                st["skipped"] += 1
                st["skipped_long"] += 1
                continue
            ids, mask = ids[:max_len], mask[:max_len]
            st["truncated"] += 1
        ex = Example(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.int8), cid)
        n = ex.trained
        if n == 0:
            st["skipped"] += 1
            st["skipped_untrained"] += 1
            continue
        out.append(ex)
        st["tokens"] += len(ex)
        st["trained_tokens"] += n
    return out, st


# ---- packing ----

def pack_bfd(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: items by length, longest first (ties: lower index first), each into the
    fullest bin it fits (ties: the bin opened first), else a new bin. Returns bins of item indices,
    in the order they were opened, each in the order its items went in."""
    if not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity: expected a positive int, got {capacity!r}")
    lengths = [int(x) for x in lengths]
    for i, x in enumerate(lengths):
        if x < 1 or x > capacity:
            raise ValueError(f"item {i}: length {x} does not fit a bin of {capacity} "
                             f"(expected 1..{capacity}; truncate or skip it first)")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), sorted: the fullest fitting bin is a bisect
    for i in order:
        x = lengths[i]
        j = bisect.bisect_left(free, (x, -1))
        if j == len(free):
            b = len(bins)
            bins.append([i])
            left = capacity - x
        else:
            left, b = free.pop(j)
            bins[b].append(i)
            left -= x
        if left > 0:
            bisect.insort(free, (left, b))
    return bins


# ---- batches ----

class SFTBatches:
    """The SFT batch source: examples to ``Batch`` objects, epoch after epoch, each epoch in an order
    drawn from ``(seed, epoch)``. Its state (epoch, batch within it) makes resume exact.

    ``inputs``: ``idx`` (R, T) int64, ``targets`` (R, T) (-100 where no loss), ``position_ids``,
    ``doc_ids``, ``attention_mask`` (R, T) int64, and for the loss the flat trained positions
    ``loss_pos`` (N,), their targets ``loss_targets`` (N,), their conversation ``loss_doc`` (N,) and
    each conversation's trained-token count ``doc_trained`` (k,); ``plain`` (0-dim bool, on the CPU):
    every row holds one conversation from position 0, so plain causal attention gives the same
    result as the masks. ``n``: trained tokens (``norm="token"``) or conversations
    (``"conversation"``); ``tokens``: non-pad tokens; ``trained``: trained tokens.

    Batches per epoch: ``ceil(rows / batch_size)`` (``"bfd"``: rows = bins; the last batch may be
    smaller) for ``"bfd"``; ``ceil(examples / batch_size)`` for the other modes.
    ``shuffle=False`` keeps the examples' order in every epoch (``"bfd"`` then packs them once, in
    ``pack_bfd``'s order)."""

    def __init__(self, examples: Sequence[Example], batch_size: int, seq_len: int, mode: str = "bfd",
                 pad_id: int = 0, seed: int = 0, norm: str = "token", device="cpu", shuffle: bool = True):
        if mode not in MODES:
            raise ValueError(f"packing mode: expected one of {MODES}, got {mode!r}")
        if norm not in NORMS:
            raise ValueError(f"loss norm: expected one of {NORMS}, got {norm!r}")
        for name, v in (("batch_size", batch_size), ("seq_len", seq_len)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if not examples:
            raise ValueError("no examples to batch (every conversation was skipped, or none was given)")
        lens = np.array([len(e) for e in examples], dtype=np.int64)
        for e, n in zip(examples, lens):
            if n > seq_len:
                raise ValueError(f"example {e.id}: {n} tokens is longer than seq_len={seq_len}; "
                                 f"encode with max_len <= seq_len")
            if n < 1:
                raise ValueError(f"example {e.id}: no tokens")
        self.mode, self.norm, self.B, self.T = mode, norm, batch_size, seq_len
        self.pad_id, self.seed, self.shuffle = int(pad_id), int(seed), bool(shuffle)
        self.device = torch.device(device)
        self.n_examples = len(examples)
        # one flat store: example i is _ids[_start[i] : _start[i] + _len[i]]
        self._len = lens
        self._start = np.zeros(len(lens), dtype=np.int64)
        np.cumsum(lens[:-1], out=self._start[1:])
        self._ids = np.concatenate([e.ids for e in examples]).astype(np.int64, copy=False)
        self._tgt = np.concatenate([e.targets() for e in examples])
        self._trained = np.array([e.trained for e in examples], dtype=np.int64)
        if (self._trained == 0).any():
            bad = examples[int(np.argmax(self._trained == 0))].id
            raise ValueError(f"example {bad}: no trained token (encode skips such conversations)")
        # what resume checks it is given the same examples: their lengths, tokens and masks
        self.fingerprint = zlib.crc32(self._tgt.tobytes(), zlib.crc32(self._ids.tobytes(), zlib.crc32(lens.tobytes())))
        self.epoch, self.cursor = 0, 0
        self._plan = self._make_plan(0)  # batches -> rows -> example indices, of epoch _plan_epoch
        self._plan_epoch = 0
        self._n_batches = len(self._plan)

    # -- the plan of one epoch: which examples go in which row of which batch --
    def _make_plan(self, epoch: int) -> list[list[list[int]]]:
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(self.n_examples)
        else:
            rng, perm = None, np.arange(self.n_examples)
        if self.mode == "bfd":
            bins = pack_bfd(self._len[perm].tolist(), self.T)
            rows = [[int(perm[j]) for j in b] for b in bins]
            if rng is not None:
                rows = [rows[j] for j in rng.permutation(len(rows))]
            return [rows[s:s + self.B] for s in range(0, len(rows), self.B)]
        if self.mode == "grouped":  # within each span: longest first, ties by index
            span = np.arange(len(perm)) // (GROUP_SPAN * self.B)
            perm = perm[np.lexsort((perm, -self._len[perm], span))]
        p = perm.tolist()
        chunks = [p[s:s + self.B] for s in range(0, len(p), self.B)]
        if self.mode == "grouped":
            if rng is not None:
                chunks = [chunks[j] for j in rng.permutation(len(chunks))]
            return [[[i] for i in c] for c in chunks]
        if self.mode == "none":
            return [[[i] for i in c] for c in chunks]
        return [[c] for c in chunks]  # padding_free: one row of all of them

    def _ensure_plan(self):
        if self._plan_epoch != self.epoch:
            self._plan = self._make_plan(self.epoch)
            self._plan_epoch = self.epoch

    def __len__(self) -> int:
        return self._n_batches

    def order(self, epoch: int) -> list[int]:
        """The example indices in the order epoch ``epoch`` feeds them (rows in batch order)."""
        return [i for batch in self._make_plan(epoch) for row in batch for i in row]

    def plan(self, epoch: int) -> list[list[list[int]]]:
        """Epoch ``epoch``'s batches, each a list of rows, each a list of example indices."""
        return self._make_plan(epoch)

    def next(self) -> Batch:
        self._ensure_plan()
        rows = self._plan[self.cursor]
        self.cursor += 1
        if self.cursor >= len(self._plan):
            self.epoch, self.cursor = self.epoch + 1, 0
        return self.build(rows)

    def build(self, rows: list[list[int]]) -> Batch:
        """The batch of these rows (lists of example indices)."""
        items = np.array([i for r in rows for i in r], dtype=np.int64)
        counts = np.array([len(r) for r in rows], dtype=np.int64)
        lens = self._len[items]
        row_of = np.repeat(np.arange(len(rows)), counts)            # (k,) each item's row
        # each item's offset inside its row: cumsum of lengths restarted per row
        csum = np.cumsum(lens) - lens
        row_first = np.cumsum(counts) - counts                       # index of each row's first item
        offset = csum - csum[row_first][row_of]
        row_len = np.add.reduceat(lens, row_first) if len(items) else np.zeros(0, np.int64)
        R = len(rows)
        T = self.T if self.mode == "bfd" else int(row_len.max())
        if self.mode == "bfd" and int(row_len.max()) > T:
            r = int(np.argmax(row_len))
            raise ValueError(f"row {r}: {int(row_len[r])} tokens do not fit seq_len={T}")
        total = int(lens.sum())
        # per token: which item, its place in the item, its flat destination
        tok_item = np.repeat(np.arange(len(items)), lens)
        within = np.arange(total) - np.repeat(csum, lens)
        src = self._start[items][tok_item] + within
        dst = (row_of * T + offset)[tok_item] + within
        idx = np.full(R * T, self.pad_id, dtype=np.int64)
        tgt = np.full(R * T, IGNORE, dtype=np.int64)
        pos = np.zeros(R * T, dtype=np.int64)
        doc = np.full(R * T, -1, dtype=np.int64)
        att = np.zeros(R * T, dtype=np.int64)
        idx[dst] = self._ids[src]
        tg = self._tgt[src]
        tgt[dst] = tg
        pos[dst] = within
        doc[dst] = tok_item
        att[dst] = 1
        keep = tg != IGNORE
        loss_pos, loss_tgt, loss_doc = dst[keep], tg[keep], tok_item[keep]
        doc_trained = self._trained[items]
        trained = int(doc_trained.sum())
        dev = self.device
        t = lambda a, shape=None: torch.from_numpy(a if shape is None else a.reshape(shape)).to(dev)  # noqa: E731
        inputs = {"idx": t(idx, (R, T)), "targets": t(tgt, (R, T)), "position_ids": t(pos, (R, T)),
                  "doc_ids": t(doc, (R, T)), "attention_mask": t(att, (R, T)),
                  "loss_pos": t(loss_pos), "loss_targets": t(loss_tgt), "loss_doc": t(loss_doc),
                  "doc_trained": t(doc_trained), "plain": torch.tensor(bool((counts == 1).all()))}
        n = trained if self.norm == "token" else len(items)
        return Batch(inputs=inputs, n=n, tokens=total, trained=trained)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "mode": self.mode,
                "batch_size": self.B, "seq_len": self.T, "examples": self.n_examples,
                "shuffle": self.shuffle, "fingerprint": self.fingerprint}

    def load_state_dict(self, d: dict) -> None:
        for k, mine in (("seed", self.seed), ("mode", self.mode), ("batch_size", self.B),
                        ("seq_len", self.T), ("examples", self.n_examples), ("shuffle", self.shuffle),
                        ("fingerprint", self.fingerprint)):
            if k in d and d[k] != mine:
                raise ValueError(f"SFT batch state: {k} is {d[k]!r} in the checkpoint but {mine!r} now; "
                                 "resume needs the same data and batching")
        epoch, cursor = d.get("epoch"), d.get("cursor")
        if not (isinstance(epoch, int) and isinstance(cursor, int) and epoch >= 0 and 0 <= cursor < len(self)):
            raise ValueError(f"SFT batch state: epoch={epoch!r} cursor={cursor!r}; expected ints, "
                             f"0 <= cursor < {len(self)}")
        self.epoch, self.cursor = epoch, cursor


# ---- the loss ----

def _module(fwd):
    """The lmforge model behind ``fwd`` when its trained-positions-only head applies, else None."""
    if getattr(fwd, "_orig_mod", None) is not None:  # torch.compile'd: keep the compiled call (full logits)
        return None
    return fwd if hasattr(fwd, "hidden_states") and hasattr(fwd, "compute_logits") else None


def sft_loss(fwd, batch: Batch, norm: str = "token") -> torch.Tensor:
    """The SUM of the cross-entropy over the batch's trained tokens (``norm="token"``), or the sum over
    its conversations of each one's mean cross-entropy (``"conversation"``); the loop divides by the
    accumulated ``n``. ``fwd``: the lmforge model (logits computed at trained positions only), or any
    callable ``fwd(idx, attention_mask=, position_ids=, doc_ids=)`` returning logits (B, T, V) (or a
    tuple whose first element they are). A MoE model's router losses are added, weighted by ``n``."""
    if norm not in NORMS:
        raise ValueError(f"loss norm: expected one of {NORMS}, got {norm!r}")
    inp = batch.inputs
    idx = inp["idx"]
    model = _module(fwd)
    moe = model is not None and getattr(getattr(model, "cfg", None), "moe", None) is not None
    kw = {}
    if not bool(inp["plain"]):
        kw = {"attention_mask": inp["attention_mask"], "position_ids": inp["position_ids"],
              "doc_ids": inp["doc_ids"]}
    elif moe:
        kw = {"attention_mask": inp["attention_mask"]}
    pos, tgt = inp["loss_pos"], inp["loss_targets"]
    aux = [] if moe else None
    if model is not None:
        h = model.hidden_states(idx, aux=aux, **kw)
        logits = model.compute_logits(h.reshape(-1, h.shape[-1]).index_select(0, pos))
    else:
        out = fwd(idx, **kw)
        logits = out[0] if isinstance(out, tuple) else out
        logits = logits.reshape(-1, logits.shape[-1]).index_select(0, pos)
    logits = logits.float()
    if norm == "token":
        from lmforge.model.kernels import cross_entropy

        loss = cross_entropy(logits.contiguous(), tgt, reduction="sum")
    else:
        ce = F.cross_entropy(logits, tgt, reduction="none")
        loss = (ce / inp["doc_trained"].index_select(0, inp["loss_doc"]).to(ce.dtype)).sum()
    if aux:
        ce_mean = loss.detach() / max(batch.n, 1)
        loss = loss + batch.n * model._router_loss(aux, ce_mean, kw.get("attention_mask"))
    return loss


def per_conversation_loss(fwd, batch: Batch) -> torch.Tensor:
    """Each conversation's mean cross-entropy (k,), in ``doc_ids`` order (for tests and evaluation)."""
    inp = batch.inputs
    model = _module(fwd)
    kw = {} if bool(inp["plain"]) else {"attention_mask": inp["attention_mask"],
                                         "position_ids": inp["position_ids"], "doc_ids": inp["doc_ids"]}
    if model is not None:
        h = model.hidden_states(inp["idx"], **kw)
        logits = model.compute_logits(h.reshape(-1, h.shape[-1]).index_select(0, inp["loss_pos"]))
    else:
        out = fwd(inp["idx"], **kw)
        logits = (out[0] if isinstance(out, tuple) else out)
        logits = logits.reshape(-1, logits.shape[-1]).index_select(0, inp["loss_pos"])
    ce = F.cross_entropy(logits.float(), inp["loss_targets"], reduction="none")
    k = inp["doc_trained"].shape[0]
    sums = torch.zeros(k, dtype=ce.dtype, device=ce.device).index_add_(0, inp["loss_doc"], ce)
    return sums / inp["doc_trained"].to(ce.dtype)


# ---- NEFTune ----

def _embedding(model) -> torch.nn.Module:
    emb = getattr(model, "tok_emb", None)
    if emb is None and hasattr(model, "get_input_embeddings"):
        emb = model.get_input_embeddings()
    if not isinstance(emb, torch.nn.Module):
        raise ValueError(f"add_neftune: {type(model).__name__} has no token embedding (tok_emb or "
                         "get_input_embeddings())")
    return emb


def add_neftune(model, alpha: float):
    """NEFTune (Jain et al. 2023): in train mode, add noise uniform in [-m, m] to the token embeddings,
    m = alpha / sqrt(L * d) with L the row length (padding included, as transformers counts it) and d
    the width. Eval mode is untouched. Returns the hook's handle (``handle.remove()`` turns it off)."""
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"neftune alpha: expected a finite number >= 0, got {alpha!r}")
    emb = _embedding(model)
    a = float(alpha)

    def hook(module, args, out):
        if not module.training or a == 0:
            return out
        mag = a / math.sqrt(out.shape[-2] * out.shape[-1])
        return out + torch.empty_like(out).uniform_(-mag, mag)

    return emb.register_forward_hook(hook)
