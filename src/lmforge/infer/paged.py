"""Paged KV cache: fixed-size blocks from one pool, a block table per sequence.

Knows blocks, block tables and how to present a batch of sequences of
different lengths to the model's attention; knows nothing about scheduling
(``engine``) or tokens. The model sees a ``PagedBatch``: for each row, its
sequence's cached keys/values gathered from the blocks plus the new ones,
padded to the longest row, with a mask of the real keys built per window by
``model.layers.causal_mask`` (``PagedBatch.mask(window)``: a layer's own window).

**Blocks by spec.** The pool is allocated per layer from the model's cache specs
(``BlockPool(model.cache_specs(), num_blocks)``; a model or a ``ModelConfig`` also works):
a ``KVSpec`` layer gets ``(num_blocks, kv_heads, block_size, head_dim)`` keys and values;
any other kind is refused (``cache.kv_specs``, a ValueError naming the layer and kind).
A per-token latent (MLA: a token-indexed spec with one ``(latent,)`` entry) would get one
``(num_blocks, block_size, latent)`` tensor per entry shape and the same block tables,
hashes and prefix caching (its entries depend only on the prefix). A fixed per-sequence
state (Mamba: ``token_indexed = False``, ``state_shapes()``) is not paged by token: it
would get one state slot per running sequence (``(max_running, *shape)``, indexed by the
``Sequence``), and since a block's contents no longer name a prefix, the engine turns
prefix caching off for such a model.
"""
from __future__ import annotations

import torch

from .cache import kv_specs


class BlockPool:
    """The blocks, and which of them hold a known prefix (prefix caching).

    A full block's contents are named by a hash chained over all tokens up to its
    end, so equal hashes mean equal keys and values. A block no sequence uses any
    more keeps its contents and waits in an LRU list; it is reused by a request
    whose prompt starts with the same tokens, or evicted (oldest first) when a
    new block is needed and the free list is empty."""

    def __init__(self, specs, num_blocks: int, block_size: int = 16, device="cpu", dtype=torch.float32):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        from collections import OrderedDict

        self.specs = kv_specs(specs, "BlockPool")
        self.block_size, self.num_blocks = block_size, num_blocks
        self.k = [torch.zeros((num_blocks, s.kv_heads, block_size, s.head_dim), device=device, dtype=dtype)
                  for s in self.specs]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))
        self.ref = [0] * num_blocks
        self.hash_of: dict[int, int] = {}  # block -> prefix hash
        self.cached: dict[int, int] = {}  # prefix hash -> block
        self.lru: OrderedDict[int, None] = OrderedDict()  # unused blocks that still hold a cached prefix

    def blocks_needed(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def available(self) -> int:
        return len(self.free) + len(self.lru)

    def allocate(self, n: int) -> list[int]:
        if n > self.available():
            raise MemoryError(f"{n} KV blocks needed, {self.available()} available")
        out = []
        for _ in range(n):
            if self.free:
                b = self.free.pop()
            else:  # evict the least recently used cached prefix
                b, _ = self.lru.popitem(last=False)
                del self.cached[self.hash_of.pop(b)]
            self.ref[b] = 1
            out.append(b)
        return out

    def release(self, blocks: list[int]) -> None:
        for b in reversed(blocks):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if b in self.hash_of:
                    self.lru[b] = None
                else:
                    self.free.append(b)

    def lookup(self, hashes: list[int]) -> list[int]:
        """Blocks holding the longest cached prefix of ``hashes`` (now referenced by the caller)."""
        out = []
        for h in hashes:
            b = self.cached.get(h)
            if b is None:
                break
            if self.ref[b] == 0:
                self.lru.pop(b, None)
            self.ref[b] += 1
            out.append(b)
        return out

    def register(self, block: int, h: int) -> None:
        if h not in self.cached and block not in self.hash_of:
            self.cached[h] = block
            self.hash_of[block] = h


def block_hashes(tokens: list[int], block_size: int, start: int = 0, prev: int | None = None) -> list[int]:
    """Chained hashes of the full blocks of ``tokens`` from block ``start`` on."""
    out = []
    h = prev if prev is not None else 0
    for j in range(start, len(tokens) // block_size):
        h = hash((h, tuple(tokens[j * block_size:(j + 1) * block_size])))
        out.append(h)
    return out


class Sequence:
    """One sequence's place in the pool: its block table and how many positions are filled."""

    def __init__(self):
        self.blocks: list[int] = []
        self.length = 0

    def ensure(self, pool: "BlockPool", n_tokens: int) -> None:
        need = pool.blocks_needed(n_tokens) - len(self.blocks)
        if need > 0:
            self.blocks += pool.allocate(need)


class PagedBatch:
    """What the model's forward needs to run rows of (possibly) different sequences at once.

    ``seqs[i]`` gets ``T`` new tokens (the batch is (B, T); rows with fewer real new
    tokens are right-padded and ``n_new[i]`` says how many are real)."""

    paged = True

    def __init__(self, pool: BlockPool, seqs: list[Sequence], n_new: list[int], T: int, device="cpu"):
        self.pool, self.seqs, self.n_new, self.T = pool, seqs, n_new, T
        for s, n in zip(seqs, n_new):
            s.ensure(pool, s.length + n)
        self.starts = torch.tensor([s.length for s in seqs], device=device)
        self.L = max(s.length + T for s in seqs)
        bs = pool.block_size
        # slot of every position 0..L-1 of every row in the flattened pool (block * bs + offset)
        nb = pool.blocks_needed(self.L)
        table = torch.tensor([s.blocks + [s.blocks[-1]] * (nb - len(s.blocks)) for s in seqs], dtype=torch.long)
        pos = torch.arange(self.L)
        self.slots = (table[:, pos // bs] * bs + pos % bs).to(device)  # (B, L)
        flat = self.slots.reshape(-1)
        self.read_block, self.read_off = flat // bs, flat % bs
        # where this step's real new tokens go: (row, t) -> slot
        rows = torch.tensor([i for i, n in enumerate(n_new) for _ in range(n)], dtype=torch.long, device=device)
        cols = torch.tensor([t for n in n_new for t in range(n)], dtype=torch.long, device=device)
        ws = self.slots[rows, self.starts[rows] + cols]
        self.write_rows, self.write_cols = rows, cols
        self.write_block, self.write_off = ws // bs, ws % bs
        self.positions = self.starts[:, None] + torch.arange(T, device=device)[None, :]  # (B, T)
        self._kpos = torch.arange(self.L, device=device)[None, :]
        self._valid = self._kpos < (self.starts + torch.tensor(n_new, device=device))[:, None]  # (B, L)

    def mask(self, window: int | None) -> torch.Tensor:
        """(B, 1, T, L): each row's real keys, causal, within ``window`` (the layer's); padded queries
        see themselves (``model.layers.causal_mask``)."""
        from ..model.layers import causal_mask

        return causal_mask(self.positions, self._kpos, window, self._valid)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write the new (B, K, T, D) keys/values of real tokens; return (B, K, L, D) of each row."""
        pool = self.pool
        B, K, T, D = k.shape
        kp = pool.k[layer].permute(0, 2, 1, 3)  # (N, bs, K, D) views of the pool
        vp = pool.v[layer].permute(0, 2, 1, 3)
        r, c = self.write_rows, self.write_cols
        kp[self.write_block, self.write_off] = k.transpose(1, 2)[r, c]
        vp[self.write_block, self.write_off] = v.transpose(1, 2)[r, c]
        k_all = kp[self.read_block, self.read_off].view(B, self.L, K, D).transpose(1, 2)
        v_all = vp[self.read_block, self.read_off].view(B, self.L, K, D).transpose(1, 2)
        return k_all, v_all

    def advance(self, T: int) -> None:
        for s, n in zip(self.seqs, self.n_new):
            s.length += n
