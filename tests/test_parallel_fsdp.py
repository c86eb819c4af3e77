"""FSDP2 (``lmforge.parallel.fsdp``) on 2 gloo ranks against one process, and Muon / AdamW on DTensors.

Every training case runs in one pair of rank processes (``_many``: one process start for all of them, the
process group reused); the one-process references run here. Each case trains the tiny model of
``tests/parallel_harness.py`` 3 steps of 2 micro-batches on the same global batch of 8 rows.
"""
from __future__ import annotations

import math

import pytest
import torch

from parallel_harness import assert_same_training, mini_train, run_ranks, tiny_config

CLIP = 0.3  # below the tiny model's gradient norms (~0.51): clipping acts on every step

CASES = {
    "adamw": dict(optimizer="adamw", grad_clip=CLIP),
    "muon": dict(optimizer="muon", grad_clip=CLIP),
    "adamw_tied": dict(optimizer="adamw", grad_clip=CLIP, model={"tie_embeddings": True}),
    "muon_tied": dict(optimizer="muon", grad_clip=CLIP, model={"tie_embeddings": True}),
    "recompute_full": dict(optimizer="muon", recompute="full"),
    "recompute_selective": dict(optimizer="adamw", recompute="selective", model={"tie_embeddings": True}),
    "recompute_every2": dict(optimizer="adamw", recompute="every:2"),
    "offload": dict(optimizer="muon", grad_clip=CLIP, cfg={"cpu_offload": True}),
    "bf16": dict(optimizer="adamw", cfg={"fsdp_mixed_precision": "bf16"}),
    # vocab 65: tok_emb and lm_head (65 rows) do not split evenly over 2 ranks (FSDP2 pads dim 0)
    "padded": dict(optimizer="adamw", model={"vocab_size": 65}, memory=True),
    "accum1": dict(optimizer="muon", accum=1, grad_clip=CLIP),
    # experts' 3-D weights sharded on the expert dimension, Muon orthogonalizing each expert whole (the
    # load-balancing loss off: it depends on each rank's batch as a whole, so it is not one process's)
    "moe_muon": dict(optimizer="muon", grad_clip=CLIP, model={"moe.n_experts": 4, "moe.top_k": 2,
                                                              "moe.d_expert": 16, "moe.aux_loss_coef": 0.0}),
    "fp16": dict(optimizer="adamw", cfg={"fsdp_mixed_precision": "fp16"}),
    "bf16_offload": dict(optimizer="adamw", cfg={"fsdp_mixed_precision": "bf16", "cpu_offload": True}),
}

_ATTN_CALLS: list = []


def _train(parallel: str, case: dict) -> dict:
    """``mini_train`` with the case's settings; ``recompute`` is applied when the model is built (before
    the strategy wraps it, as the trainer does), and every block's attention forward is counted."""
    import lmforge.model.transformer as tr
    from lmforge.train.recompute import apply_recompute

    case = dict(case)
    rec = case.pop("recompute", "none")
    orig = tr.Transformer
    calls = [0]

    class Recomputed(orig):
        def __init__(self, cfg):
            super().__init__(cfg)
            apply_recompute(self, rec)
            for b in self.blocks:
                b.attn.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))

    import torch.distributed as dist

    comm = {"all_gather": 0, "all_gather_bytes": 0, "reduce_scatter": 0, "reduce_scatter_bytes": 0}
    saved = dist.all_gather_single, dist.reduce_scatter_single

    def all_gather_single(output_tensor, input_tensor, *a, **kw):  # FSDP2's own collectives (not DTensor's)
        comm["all_gather"] += 1
        comm["all_gather_bytes"] += output_tensor.numel() * output_tensor.element_size()
        return saved[0](output_tensor, input_tensor, *a, **kw)

    def reduce_scatter_single(output, input, *a, **kw):
        comm["reduce_scatter"] += 1
        comm["reduce_scatter_bytes"] += input.numel() * input.element_size()
        return saved[1](output, input, *a, **kw)

    tr.Transformer = Recomputed
    dist.all_gather_single, dist.reduce_scatter_single = all_gather_single, reduce_scatter_single
    try:
        res = mini_train(parallel, **case)
    finally:
        tr.Transformer = orig
        dist.all_gather_single, dist.reduce_scatter_single = saved
    res["attn_calls"] = calls[0]
    res["comm"] = comm
    return res


def _many(cases: dict) -> dict:
    out = {name: _train("fsdp", case) for name, case in cases.items()}
    out["_dtensor"] = _dtensor_optim_case()  # in the same processes (one start for the whole module)
    out["_errors"] = _rank_errors()
    return out


def _rank_errors() -> list:
    """The errors ``check`` raises on this rank (of a 2-rank group) for bad settings."""
    from lmforge.model.transformer import Transformer
    from lmforge.parallel import make_strategy
    from lmforge.train.loop import LoopConfig

    errs = []
    for bad in ({"fsdp_mixed_precision": "bf32"}, {"tp_size": 2}):
        st = make_strategy(LoopConfig(parallel="fsdp", max_steps=1, **bad))
        try:
            st.check(Transformer(tiny_config()))
            errs.append("no error")
        except ValueError as e:
            errs.append(str(e))
    return errs


@pytest.fixture(scope="module")
def fsdp_runs():
    return run_ranks(2, "test_parallel_fsdp:_many", timeout=300, cases=CASES)


@pytest.fixture(scope="module")
def refs():
    return {}


def _ref(refs, name):
    """One process on the case's model and optimizer: no FSDP settings, and no recompute (recompute must
    not change the numbers)."""
    if name not in refs:
        case = {k: v for k, v in CASES[name].items() if k not in ("memory", "recompute", "cfg")}
        refs[name] = _train("none", case)
    return refs[name]


@pytest.mark.parametrize("name", ["adamw", "muon", "adamw_tied", "muon_tied", "accum1", "padded", "offload",
                                  "moe_muon"])
def test_fsdp_equals_one_process(fsdp_runs, refs, name):
    ref, got = _ref(refs, name), fsdp_runs[0][name]
    assert_same_training(ref, got)
    assert fsdp_runs[1][name]["state"] is None  # full_state_dict: rank 0 only
    assert fsdp_runs[0][name]["losses"] == fsdp_runs[1][name]["losses"]
    assert fsdp_runs[0][name]["gnorms"] == fsdp_runs[1][name]["gnorms"]  # the same float on every rank
    assert got["describe"]["strategy"] == "fsdp" and got["describe"]["world_size"] == 2
    if CASES[name].get("grad_clip") == CLIP:
        assert min(got["gnorms"]) > CLIP  # clipping acted


def test_fsdp_tied_embeddings_stay_tied(fsdp_runs):
    st = fsdp_runs[0]["adamw_tied"]["state"]
    assert torch.equal(st["tok_emb.weight"], st["lm_head.weight"])
    st = fsdp_runs[0]["adamw"]["state"]
    assert not torch.equal(st["tok_emb.weight"], st["lm_head.weight"])


@pytest.mark.parametrize("name,per_step", [("recompute_full", 8), ("recompute_selective", 8),
                                           ("recompute_every2", 6)])
def test_fsdp_with_recompute_equals_one_process(fsdp_runs, refs, name, per_step):
    """Recompute composed with FSDP2: the same training as one process without it, and the attention
    forwards really ran again in backward (2 blocks x 2 micro-batches x 3 steps = 12 forwards, each
    recomputed block's once more in backward: 8 per step with full or selective, 6 with every:2)."""
    ref, got = _ref(refs, name), fsdp_runs[0][name]
    assert_same_training(ref, got)
    assert ref["attn_calls"] == 2 * 2 * 3  # without recompute each block forwards once per micro-batch
    assert got["attn_calls"] == per_step * 3, got["attn_calls"]


def test_fsdp_bf16_close_to_fp32(fsdp_runs, refs):
    """bf16 parameters and compute, fp32 reduction and fp32 master weights: close to one fp32 process, not
    equal. Measured (3 AdamW steps): losses within 1.1e-4 relative, gradient norms 3.8e-3; the weights'
    difference is 8% of the update's size as a norm (AdamW normalizes tiny gradients to +-lr steps, so
    where bf16 flips a tiny gradient's sign the weight moves the other way: max |difference| 0.032, mean
    6e-4 against a mean update of 0.016). The bounds are 5-10x those figures."""
    from lmforge.model.transformer import Transformer

    ref, got = _ref(refs, "bf16"), fsdp_runs[0]["bf16"]
    for a, b in zip(ref["losses"], got["losses"]):
        assert abs(a - b) <= 1e-3 * abs(a), (ref["losses"], got["losses"])
    for a, b in zip(ref["gnorms"], got["gnorms"]):
        assert abs(a - b) <= 2e-2 * abs(a), (ref["gnorms"], got["gnorms"])
    torch.manual_seed(0)
    init = Transformer(tiny_config()).state_dict()
    diff = torch.cat([(got["state"][k] - t).flatten() for k, t in ref["state"].items()])
    update = torch.cat([(t - init[k]).flatten() for k, t in ref["state"].items()])
    rel = (diff.norm() / update.norm()).item()
    assert 1e-4 < rel <= 0.4, rel  # not equal (bf16 really ran), but the same training
    assert diff.abs().mean() <= 0.1 * update.abs().mean()
    assert all(t.dtype == torch.float32 for t in got["state"].values())  # master weights stay fp32


def test_fsdp_collectives_per_step(fsdp_runs):
    """What FSDP2 moves (its own all-gathers and reduce-scatters, counted in the rank processes): per
    micro-batch 3 unit all-gathers in forward (root + 2 blocks) and 2 in backward (the blocks, resharded
    after forward; the root is kept); one reduce-scatter per unit per step, on the last micro-batch only
    (no sync before it). Bytes: the whole model (Psi) gathered in each forward, the blocks again in each
    backward, Psi of fp32 gradients reduce-scattered per step; bf16 halves the all-gathers only."""
    shapes = _model_numel({})
    psi = sum(math.prod(s) for s in shapes) * 4
    root = (64 * 32 * 2 + 32) * 4  # tok_emb, lm_head, norm_f
    steps, accum = 3, 2
    c = fsdp_runs[0]["adamw"]["comm"]
    assert c["reduce_scatter"] == 3 * steps  # 18 if every micro-batch synchronized
    assert c["reduce_scatter_bytes"] == psi * steps
    assert c["all_gather"] == (3 + 2) * accum * steps
    assert c["all_gather_bytes"] == (psi + (psi - root)) * accum * steps
    assert fsdp_runs[0]["accum1"]["comm"]["reduce_scatter"] == 3 * steps
    assert fsdp_runs[0]["recompute_full"]["comm"] == c  # recompute runs inside the gathered unit
    b = fsdp_runs[0]["bf16"]["comm"]
    assert b["all_gather_bytes"] * 2 == c["all_gather_bytes"] and b["reduce_scatter_bytes"] == c["reduce_scatter_bytes"]


def test_fsdp_cpu_offload_changes_nothing_on_the_cpu(fsdp_runs):
    """On a CPU-only run the offload path's copies are no-ops: bit-equal to the run without it."""
    x, y = fsdp_runs[0]["bf16"], fsdp_runs[0]["bf16_offload"]
    assert x["losses"] == y["losses"] and x["gnorms"] == y["gnorms"]
    assert all(torch.equal(x["state"][k], y["state"][k]) for k in x["state"])
    assert fsdp_runs[0]["offload"]["describe"]["cpu_offload"] is True


def test_fsdp_fp16_runs_close_to_fp32(fsdp_runs, refs):
    ref, got = _ref(refs, "fp16"), fsdp_runs[0]["fp16"]
    for a, b in zip(ref["losses"], got["losses"]):
        assert 0 < abs(a - b) <= 1e-3 * abs(a), (ref["losses"], got["losses"])
    assert all(t.dtype == torch.float32 for t in got["state"].values())


def _model_numel(model_over: dict) -> list:
    from lmforge.model.transformer import Transformer

    net = Transformer(tiny_config(**model_over))
    seen, shapes = set(), []
    for p in net.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            shapes.append(tuple(p.shape))
    return shapes


def test_fsdp_memory_bytes_is_the_local_shards(fsdp_runs):
    """Parameters, gradients and AdamW's two moments per rank: about half of one process; exactly the
    padded shards FSDP2 allocates (ceil(dim0 / 2) rows of each tensor, on every rank), while the
    unpadded bytes are torch.chunk's split (rank 0 holds 33 of the head's 65 rows, rank 1 32)."""
    shapes = _model_numel({"vocab_size": 65})
    full = sum(math.prod(s) for s in shapes) * 4
    rest = [math.prod(s[1:]) for s in shapes]
    padded = sum(math.ceil(s[0] / 2) * r for s, r in zip(shapes, rest)) * 4
    chunk = [sum(len(range(s[0])[rk * math.ceil(s[0] / 2):(rk + 1) * math.ceil(s[0] / 2)]) * q
                 for s, q in zip(shapes, rest)) * 4 for rk in range(2)]  # torch.chunk's rows per rank
    assert chunk[0] + chunk[1] == full and chunk[0] > chunk[1]
    steps = 4 * len(shapes)  # AdamW's step counters (fp32 scalars, one per parameter)
    for rk in range(2):
        m = fsdp_runs[rk]["padded"]["memory"]
        assert m["params"] == padded and m["grads"] == padded, (m, padded)
        assert m["params_unpadded"] == chunk[rk] and m["grads_unpadded"] == chunk[rk]
        assert m["optim"] == 2 * chunk[rk] + steps == m["optim_unpadded"]  # moments: zeros_like(unpadded shard)
        assert abs(m["params"] / full - 0.5) < 0.01


# ---- optimizers on DTensors (no FSDP): Muon's full-matrix path, AdamW's foreach and fused paths ----

def _dtensor_optim_case() -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lmforge.train.optim import AdamW, Muon, WeightEMA

    torch.set_num_threads(1)
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,))
    g = torch.Generator().manual_seed(0)
    # (shape, placement): uneven rows (Shard(0), 13 rows), columns (Shard(1), tensor parallel's row-wise),
    # a fused [q; k; v] matrix with splits
    specs = [((13, 8), Shard(0)), ((6, 10), Shard(1)), ((12, 6), Shard(0))]
    splits = {2: [6, 3, 3]}
    full = [torch.randn(s, generator=g) for s, _ in specs]
    grads = [[torch.randn(s, generator=g) for s, _ in specs] for _ in range(3)]
    out = {}
    for kind in ("muon", "adamw", "adamw_fused"):
        plain = [torch.nn.Parameter(t.clone()) for t in full]
        shard = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [pl])) for t, (_, pl) in zip(full, specs)]

        def make(ps):
            if kind == "muon":
                return Muon(ps, lr=0.02, weight_decay=0.1, splits={ps[i]: s for i, s in splits.items()})
            return AdamW(ps, lr=1e-2, weight_decay=0.1, fused=kind == "adamw_fused")
        o1, o2 = make(plain), make(shard)
        for gs in grads:
            for p, q, gr in zip(plain, shard, gs):
                p.grad = gr.clone()
                q.grad = distribute_tensor(gr.clone(), mesh, q.placements)
            o1.step()
            o2.step()
        out[kind] = max((p.detach() - q.detach().full_tensor()).abs().max().item() for p, q in zip(plain, shard))
        out[kind + "_moved"] = max((p.detach() - t).abs().max().item() for p, t in zip(plain, full))
        out[kind + "_placements"] = [str(q.placements) for q in shard]
        if kind == "adamw":  # the weight average over DTensors (WeightEMA: foreach lerp on the shards)
            e1, e2 = WeightEMA(plain, 0.5), WeightEMA(shard, 0.5)
            for _ in range(2):
                for p, q in zip(plain, shard):
                    p.data.mul_(1.5)
                    q.data.mul_(1.5)
                e1.step()
                e2.step()
            e1.copy_to_model()
            e2.copy_to_model()
            out["ema"] = max((p.detach() - q.detach().full_tensor()).abs().max().item() for p, q in zip(plain, shard))
    out.update(_eval_forward(mesh))
    out.update(_kept_after_forward(mesh))
    return out


def _kept_after_forward(mesh) -> dict:
    """``shard_model(reshard_after_forward=False)``: the blocks' parameters stay gathered from forward to
    backward (3 all-gathers per step, none in backward); training equals the plain model's (both ranks
    read the same batch here, so the averaged gradient is that batch's)."""
    import torch.distributed as dist

    from lmforge.model.transformer import Transformer
    from lmforge.parallel.fsdp import shard_model
    from lmforge.train.optim import AdamW

    torch.manual_seed(0)
    plain = Transformer(tiny_config())
    net = Transformer(tiny_config())
    net.load_state_dict(plain.state_dict())
    shard_model(net, mesh, reshard_after_forward=False)
    o1, o2 = AdamW(plain.parameters(), lr=1e-2), AdamW(net.parameters(), lr=1e-2)
    data = torch.randint(0, 64, (2, 4, 9), generator=torch.Generator().manual_seed(5))
    gathers = [0]
    saved = dist.all_gather_single

    def count(*a, **kw):
        gathers[0] += 1
        return saved(*a, **kw)
    dist.all_gather_single = count
    try:
        for x in data:
            for m, o in ((plain, o1), (net, o2)):
                m(x[:, :-1], x[:, 1:])[1].backward()
                o.step()
                o.zero_grad()
    finally:
        dist.all_gather_single = saved
    sd = {k: v.full_tensor() for k, v in net.state_dict().items()}
    return {"kept_err": max((sd[k] - v).abs().max().item() for k, v in plain.state_dict().items()),
            "kept_gathers": gathers[0]}


def _eval_forward(mesh) -> dict:
    """A forward without gradients (evaluation) on the sharded model: the same logits as one process, and
    every parameter a DTensor shard again afterwards (the root's gathered tensors freed)."""
    from torch.distributed.tensor import DTensor

    from lmforge.model.transformer import Transformer
    from lmforge.parallel.fsdp import shard_model

    torch.manual_seed(0)
    plain = Transformer(tiny_config(tie_embeddings=True))
    net = Transformer(tiny_config(tie_embeddings=True))
    net.load_state_dict(plain.state_dict())
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    shard_model(net, mesh)
    net.eval()
    with torch.no_grad():
        got = net(x)
        want = plain(x)
    return {"eval_logits": (got - want).abs().max().item(),
            "eval_all_sharded": all(isinstance(p, DTensor) for p in net.parameters()),
            "eval_tied": net.tok_emb.weight is net.lm_head.weight}


def test_muon_and_adamw_on_dtensors_equal_plain_tensors(fsdp_runs):
    """Muon on DTensors sharded on dim 0 (uneven) and dim 1 gathers each matrix, orthogonalizes it whole
    and keeps its shard: the same update as on plain tensors; AdamW (foreach and fused) likewise."""
    for r in (run["_dtensor"] for run in fsdp_runs):
        assert r["ema"] <= 1e-6
        assert r["eval_logits"] <= 1e-5 and r["eval_all_sharded"] and r["eval_tied"]
        assert r["kept_err"] <= 1e-5 and r["kept_gathers"] == 3 * 2
        for kind in ("muon", "adamw", "adamw_fused"):
            assert r[kind + "_moved"] > 1e-3  # the optimizer did move the weights
            assert r[kind] <= 1e-6, (kind, r[kind])
            assert "Shard(dim=1)" in r[kind + "_placements"][1]  # the parameter stayed sharded


def test_fsdp_on_one_process_equals_no_strategy():
    """parallel = "fsdp" with WORLD_SIZE=1 (no process group from torchrun): a group of one is made, the
    model is sharded into one piece, and training is the plain run's."""
    got = run_ranks(1, "parallel_harness:mini_train", parallel="fsdp", optimizer="muon", grad_clip=CLIP)[0]
    assert_same_training(mini_train("none", optimizer="muon", grad_clip=CLIP), got)


def test_newton_schulz_of_a_shard_is_not_the_shard_of_the_whole():
    """Why Muon gathers: orthogonalizing each half of a matrix alone gives another update."""
    from lmforge.train.optim import newton_schulz

    G = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    whole = newton_schulz(G)
    halves = torch.cat([newton_schulz(h) for h in G.chunk(2)])
    assert (whole - halves).abs().max() > 1e-2


# ---- bad settings: raised by check, on every rank alike, before any collective ----

def _strategy(**cfg):
    from lmforge.parallel.env import DistEnv
    from lmforge.parallel.fsdp import FSDPStrategy
    from lmforge.train.loop import LoopConfig

    return FSDPStrategy(LoopConfig(parallel="fsdp", max_steps=1, **cfg), DistEnv())


def test_fsdp_check_names_bad_settings(caplog):
    from lmforge.model.transformer import Transformer

    net = Transformer(tiny_config())
    with pytest.raises(ValueError, match="fsdp_mixed_precision.*'int8'"):
        _strategy(fsdp_mixed_precision="int8").check(net)
    with pytest.raises(ValueError, match="tp_size"):
        _strategy(tp_size=2).check(net)
    with pytest.raises(ValueError, match="sequence_parallel"):
        _strategy(sequence_parallel=True).check(net)
    with pytest.raises(ValueError, match="model.blocks"):
        _strategy().check(torch.nn.Linear(2, 2))
    with caplog.at_level("WARNING", logger="lmforge.parallel"):
        _strategy(fsdp_mixed_precision="bf16").check(net)
    assert "bf16" in caplog.text and "CPU" in caplog.text


def test_fsdp_bad_settings_fail_alike_on_every_rank(fsdp_runs):
    e0, e1 = fsdp_runs[0]["_errors"], fsdp_runs[1]["_errors"]
    assert e0 == e1
    assert "fsdp_mixed_precision" in e0[0] and "'bf32'" in e0[0] and "tp_size = 2" in e0[1]


def test_shard_model_rejects_a_model_without_blocks():
    from lmforge.parallel.fsdp import shard_model

    with pytest.raises(ValueError, match="model.blocks"):
        shard_model(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="fsdp_mixed_precision"):
        shard_model(torch.nn.Linear(2, 2), mixed_precision="bf32")
