"""Counting collectives: the ring volumes, every path a collective takes (python calls, DTensor's
functional collectives, FSDP2, DDP's C++ reducer, seen by the dispatch mode and by a DDP hook),
and DDP's counted volume against its theory (2 ranks, gloo)."""
from __future__ import annotations

import pytest
import torch

from lmforge.parallel import comm as C
from parallel_harness import run_ranks


def test_ring_volumes():
    assert C.Call("all_reduce", "x", 100, 4, 4).volume == 150  # 2 n (N-1)/N
    assert C.Call("reduce_scatter", "x", 100, 4, 4).volume == 75
    assert C.Call("all_gather", "x", 100, 4, 4).volume == 75
    assert C.Call("broadcast", "x", 100, 4, 4).volume == 100
    assert C.Call("all_reduce", "x", 100, 4, 1).volume == 0  # a group of one moves nothing
    assert C.Call("all_reduce", "x", 8, 4, 2).small and not C.Call("all_reduce", "x", 9, 4, 2).small


def test_theoretical_volumes():
    psi, N = 1000, 4
    f = 3 / 4
    assert C.theoretical_volume("ddp", psi, N) == {"all_reduce": 2 * psi * f}
    assert C.theoretical_volume("zero1", psi, N, paper=True) == {"reduce_scatter": psi * f, "all_gather": psi * f}
    assert C.theoretical_volume("zero1", psi, N) == {"all_reduce": 2 * psi * f, "all_gather": psi * f}
    assert C.theoretical_volume("ddp", psi, N, n_tensors=3) == {"all_reduce": 2 * (psi + 3) * f}  # a used map
    # gradients reduce once per step; parameters gather for every micro-batch (ZeRO-3: forward and backward)
    assert C.theoretical_volume("zero2", psi, N, micro_batches=2) == {"reduce_scatter": psi * f, "all_gather": psi * f}
    assert C.theoretical_volume("zero3", psi, N, micro_batches=2) == {"reduce_scatter": psi * f,
                                                                       "all_gather": 4 * psi * f}
    assert sum(C.theoretical_volume("fsdp", psi, N).values()) == 3 * psi * f
    assert C.theoretical_volume("fsdp", psi, N, root_params=100) == {"reduce_scatter": psi * f,
                                                                      "all_gather": (2 * 900 + 100) * f}
    assert C.theoretical_volume("zero2", psi, N, muon_params=10)["all_gather"] == (psi + 10) * f
    assert C.theoretical_volume("tp", 0, 2, act_elements=10, n_layer=3) == {"all_reduce": 4 * 3 * 2 * 10 * 0.5}
    both = C.theoretical_volume("tp+fsdp", psi, 4, act_elements=10, n_layer=3, tp=2)
    assert both == {"all_reduce": 4 * 3 * 2 * 10 * 0.5, "reduce_scatter": psi * 0.5, "all_gather": 2 * psi * 0.5}
    with pytest.raises(ValueError, match="strategy"):
        C.theoretical_volume("pipeline", psi, N)
    with pytest.raises(ValueError, match="paper"):
        C.theoretical_volume("tp", psi, N, paper=True)
    with pytest.raises(ValueError, match="does not divide"):
        C.theoretical_volume("tp+fsdp", psi, 4, tp=3)


def test_padded_params():
    from lmforge.model.transformer import Transformer
    from parallel_harness import tiny_config

    net = Transformer(tiny_config(vocab_size=65))  # 65 rows: odd, padded by FSDP2 and ZeRO alike
    n = sum(p.numel() for p in net.parameters())
    assert C.padded_params(net, "ddp", 2)["all"] == n
    assert C.padded_params(net, "fsdp", 2)["all"] == n + 2 * 32  # tok_emb and lm_head: 66 rows
    assert C.padded_params(net, "zero1", 2)["all"] == n  # 65 x 32 elements: even, no padding
    assert C.padded_params(net, "zero1", 3)["all"] > n
    tp = C.padded_params(net, "tp", 2)
    assert tp["root"] == C.padded_params(net, "ddp", 2)["root"]  # embeddings, head, final norm: replicated
    assert tp["all"] < n
    assert C.padded_params(net, "zero2", 2, optimizer="muon")["muon"] == 2 * (64 * 32 + 32 * 32 + 128 * 32 + 32 * 64)


def paths():
    """On each rank: one collective by each route, counted."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    out = {}
    with C.count_comm() as c:
        t = torch.ones(10)
        dist.all_reduce(t)
        o = torch.empty(20)
        dist.all_gather_into_tensor(o, t)
        dist.reduce_scatter_tensor(torch.empty(5), t)
        dist.broadcast(t, src=0)
    out["python"] = [(x.kind, x.numel, x.group_size) for x in c.calls]
    torch.manual_seed(0)
    m = DDP(torch.nn.Linear(4, 4))
    with C.count_comm() as c:
        C.install_ddp_hook(m, c)
        m(torch.randn(2, 4)).sum().backward()
    out["ddp"] = [(x.kind, x.numel) for x in c.calls]
    out["ddp_hook"] = list(c.hook_buckets)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))
    for layer in net:
        fully_shard(layer)
    fully_shard(net)
    with C.count_comm() as c:
        net(torch.randn(2, 5)).sum().backward()
    out["fsdp"] = [(x.kind, x.numel) for x in c.calls]
    mesh = init_device_mesh("cpu", (2,))
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    parallelize_module(mlp, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    with C.count_comm() as c:
        mlp(torch.randn(3, 4, requires_grad=True)).sum().backward()
    out["tp"] = [(x.kind, x.numel) for x in c.calls]
    return out


def test_every_path_is_counted():
    got = run_ranks(2, "test_parallel_comm:paths")
    for r in got:
        assert r["python"] == [("all_reduce", 10, 2), ("all_gather", 20, 2), ("reduce_scatter", 10, 2),
                               ("broadcast", 10, 2)]
        # DDP's reducer (C++) all-reduces its one bucket of 20 elements; the hook saw the same bucket
        assert r["ddp"] == [("all_reduce", 20)] and r["ddp_hook"] == [20]
        # FSDP2: each layer gathered for the forward and again for the backward (the root holds no
        # parameters), then its gradients reduce-scattered; the sizes are padded to whole rows per rank:
        # layer 0 (4x5 + 4) 24, layer 1 (3x4 + 3 -> 4 rows on 2 ranks: 4x4 + 4) 20, not 15
        assert sorted(r["fsdp"]) == sorted([("all_gather", 24)] * 2 + [("all_gather", 20)] * 2
                                           + [("reduce_scatter", 24), ("reduce_scatter", 20)])
        # TP (DTensor): the row-wise output all-reduced forward, the column-wise input's gradient backward
        assert r["tp"] == [("all_reduce", 12), ("all_reduce", 12)]


def ddp_step(accum: int = 2):
    """One training step of the tiny model under torch's DDP (no_sync but the last micro-batch), counted."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lmforge.model.transformer import Transformer
    from parallel_harness import tiny_config

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    net = Transformer(tiny_config())
    ddp = DDP(net)
    counter = C.CommCounter()
    C.install_ddp_hook(ddp, counter)
    x = torch.randint(0, 64, (accum, 2, 17))
    with counter:
        for i in range(accum):
            ctx = ddp.no_sync() if i < accum - 1 else torch.enable_grad()
            with ctx:
                _, loss = ddp(x[i, :, :-1], x[i, :, 1:])
                loss.backward()
    n = sum(p.numel() for p in net.parameters())
    return {"summary": counter.summary(), "small": counter.summary(small=True), "buckets": counter.hook_buckets,
            "n": n}


def test_ddp_counted_equals_theory():
    got = run_ranks(2, "test_parallel_comm:ddp_step")
    for r in got:
        n = r["n"]
        assert sum(r["buckets"]) == n  # the hook saw every gradient once (in one bucket: DDP's first is 1 MB)
        s = r["summary"]
        assert s["all_reduce"]["elements"] == n
        theory = C.theoretical_volume("ddp", n, 2, micro_batches=2)
        assert s["all_reduce"]["volume"] == theory["all_reduce"] == n  # 2 n (2-1)/2
        assert s["total_volume"] == theory["all_reduce"]
        assert s["total_volume_bytes"] == 4 * n
