"""Paged KV cache: fixed-size blocks from one pool, a block table per sequence.

Knows blocks, block tables and how to present a batch of sequences of
different lengths to the model's attention; knows nothing about scheduling
(``engine``) or tokens. The model sees a ``PagedBatch``: for each row, its
sequence's cached keys/values gathered from the blocks plus the new ones,
padded to the longest row, with a mask of the real keys.
"""
from __future__ import annotations

import torch


class BlockPool:
    def __init__(self, cfg, num_blocks: int, block_size: int = 16, device="cpu", dtype=torch.float32):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.cfg, self.block_size, self.num_blocks = cfg, block_size, num_blocks
        shape = (num_blocks, cfg.kv_heads, block_size, cfg.hd)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))

    def blocks_needed(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise MemoryError(f"{n} KV blocks needed, {len(self.free)} free")
        return [self.free.pop() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        self.free.extend(reversed(blocks))


class Sequence:
    """One sequence's place in the pool: its block table and how many positions are filled."""

    def __init__(self):
        self.blocks: list[int] = []
        self.length = 0

    def ensure(self, pool: BlockPool, n_tokens: int) -> None:
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
        rows = []
        for s in seqs:
            table = torch.tensor(s.blocks + [s.blocks[-1]] * (pool.blocks_needed(self.L) - len(s.blocks)),
                                 dtype=torch.long)
            pos = torch.arange(self.L)
            rows.append(table[pos // bs] * bs + pos % bs)
        self.slots = torch.stack(rows).to(device)  # (B, L)
        kpos = torch.arange(self.L, device=device)[None, :]
        qpos = (self.starts[:, None] + torch.arange(T, device=device)[None, :])  # (B, T)
        self.positions = qpos
        valid_k = kpos < (self.starts + torch.tensor(n_new, device=device))[:, None]  # (B, L)
        allowed = (kpos[:, None, :] <= qpos[:, :, None]) & valid_k[:, None, :]
        w = pool.cfg.sliding_window
        if w is not None:
            allowed = allowed & (qpos[:, :, None] - kpos[:, None, :] < w)
        allowed = allowed | (kpos[:, None, :] == qpos[:, :, None])  # padded queries see themselves
        self.mask = allowed[:, None]  # (B, 1, T, L)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write the new (B, K, T, D) keys/values of real tokens; return (B, K, L, D) of each row."""
        pool = self.pool
        B, K, T, D = k.shape
        kp = pool.k[layer].permute(0, 2, 1, 3)  # (N, bs, K, D) view
        vp = pool.v[layer].permute(0, 2, 1, 3)
        bs = pool.block_size
        for i, (s, n) in enumerate(zip(self.seqs, self.n_new)):
            if n == 0:
                continue
            slots = self.slots[i, s.length:s.length + n]
            kp[slots // bs, slots % bs] = k[i, :, :n].transpose(0, 1)
            vp[slots // bs, slots % bs] = v[i, :, :n].transpose(0, 1)
        flat = self.slots.reshape(-1)
        k_all = kp[flat // bs, flat % bs].view(B, self.L, K, D).transpose(1, 2)
        v_all = vp[flat // bs, flat % bs].view(B, self.L, K, D).transpose(1, 2)
        return k_all, v_all

    def advance(self, T: int) -> None:
        for s, n in zip(self.seqs, self.n_new):
            s.length += n
