"""ZeRO-1/2/3 (lmforge.parallel.zero) on 2 and 3 gloo ranks against one process.

Each stage with AdamW and with Muon, gradient accumulation 2 and clipping that bites (grad_clip
below every step's norm), equals one process (losses, gradient norms, final parameters, 1e-5);
the bytes each rank holds are the partition's (ceil(n / N) elements per parameter, padding counted:
3 ranks pad every tensor here); what the collectives move per step is the stage's volume; ZeRO-3
really releases a unit's parameters outside its forward and backward (storage sizes seen from
hooks); checkpoint state is ``get_state_dict``'s form, so a run resumes across one process and the
stages; bad settings and an optimizer that cannot be sharded fail with errors naming them.

The rank processes run everything of one world size in one call (``many``), so the module costs
two process start-ups, not twenty.
"""
from __future__ import annotations

import math

import pytest
import torch

from parallel_harness import assert_same_training, global_batches, mini_train, run_ranks, tiny_config

CLIP = 0.3  # below every step's gradient norm of this model (checked): clipping acts on every step
STAGES = ("zero1", "zero2", "zero3")
OPTIMIZERS = ("adamw", "muon")


# ---- a local loop: mini_train plus checkpoint state in and out, and the strategy's own counts ----

def train(parallel: str = "none", optimizer: str = "adamw", steps: int = 2, start: int = 0, total: int = 4,
          global_b: int = 8, accum: int = 2, T: int = 16, lr: float = 1e-2, seed: int = 0, load: dict | None = None,
          save: bool = False, roundtrip: bool = False, recompute: str = "none") -> dict:
    """Steps ``start .. start+steps-1`` of a ``total``-step run (the same batches as one run of ``total``
    steps), from ``load`` (``get_state_dict``'s form) when given; returns losses, gradient norms, the
    final full state (rank 0), with ``save`` the checkpoint state, and per-step collective counts.
    ``roundtrip``: before every step, the strategy's own ``dcp_state`` goes straight back into
    ``load_dcp_state`` (the live tensors, as DCP fills them in place): the run must not change.
    ``recompute``: ``train.recompute.apply_recompute``'s policy, applied before the wrap."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from lmforge.model.transformer import Transformer
    from lmforge.parallel import make_strategy
    from lmforge.train.loop import LoopConfig
    from lmforge.train.optim import build_optimizers

    torch.set_num_threads(1)
    strategy = make_strategy(LoopConfig(parallel=parallel, max_steps=total))
    B = global_b // strategy.dp_size
    strategy.cfg = LoopConfig(parallel=parallel, batch_size=B, grad_accum=accum, max_steps=total, grad_clip=CLIP,
                              optimizer=optimizer, lr=lr)
    mcfg = tiny_config()
    torch.manual_seed(seed)
    net = Transformer(mcfg)
    if recompute != "none":
        from lmforge.train.recompute import apply_recompute

        apply_recompute(net, recompute)
    strategy.check(net)
    fwd = strategy.wrap(net)
    opts = strategy.wrap_optimizers(net, build_optimizers(net, optimizer, lr=lr, weight_decay=0.1, muon_lr=lr,
                                                          fused=False))
    if load is not None:
        if parallel == "none":
            o = load["optim"]  # (the strategies give one state per optimizer; torch's function takes them merged)
            if isinstance(o, list):
                o = {"state": {k: v for x in o for k, v in x["state"].items()},
                     "param_groups": [g for x in o for g in x["param_groups"]]}
            set_state_dict(net, opts, model_state_dict=load["model"], optim_state_dict=o)
        else:
            strategy.load_dcp_state(net, opts, load)
    data = global_batches(total, accum, global_b, T, mcfg.vocab_size, seed)
    losses, gnorms, comm = [], [], []
    for s in range(start, start + steps):
        if roundtrip:
            strategy.load_dcp_state(net, opts, strategy.dcp_state(net, opts))
        if parallel != "none":
            strategy.comm.reset()
        micro = data[s, :, strategy.dp_rank * B:(strategy.dp_rank + 1) * B]
        N = strategy.all_sum([micro[:, :, 1:].numel()])[0]
        loss_sum = 0.0
        for i in range(accum):
            x, y = micro[i, :, :-1], micro[i, :, 1:]
            with strategy.micro_batch(fwd, last=i == accum - 1):
                _, loss = fwd(x, y)
                loss = loss * y.numel()
                (loss * strategy.grad_scale / N).backward()
            loss_sum += loss.item()
        losses.append(strategy.all_sum([loss_sum])[0] / N)
        gnorms.append(strategy.clip_grad_norm(net, CLIP))
        strategy.step(opts)
        strategy.zero_grad(opts)
        if parallel != "none":
            comm.append(dict(strategy.comm.elements))
    out = {"losses": losses, "gnorms": gnorms, "comm": comm, "state": strategy.full_state_dict(net)}
    if save:
        if parallel == "none":
            m, o = get_state_dict(net, opts)
            st = {"model": m, "optim": o}
        else:
            st = strategy.dcp_state(net, opts)
        out["ckpt"] = _clone(st)
    return out


def _clone(x):
    if torch.is_tensor(x):
        return x.detach().cpu().clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clone(v) for v in x]
    return x


def release_check(steps: int = 2) -> dict:
    """ZeRO-3 on this rank: the bytes each unit's parameters occupy, seen from hooks registered after the
    strategy's: at each block's forward (after the gather), at each block's backward (a hook on its
    output, after the strategy's), and after each step; plus the bytes outside any forward."""
    from lmforge.model.transformer import Transformer
    from lmforge.parallel import make_strategy
    from lmforge.train.loop import LoopConfig

    torch.set_num_threads(1)
    strategy = make_strategy(LoopConfig(parallel="zero3", max_steps=steps))
    torch.manual_seed(0)
    net = Transformer(tiny_config())
    fwd = strategy.wrap(net)

    def held(m):
        return sum(p.untyped_storage().nbytes() for p in m.parameters())

    units = {"block0": net.blocks[0], "block1": net.blocks[1], "tok_emb": net.tok_emb, "norm_f": net.norm_f,
             "lm_head": net.lm_head}
    log = []

    def snapshot(event):
        log.append((event, {k: held(m) for k, m in units.items()}))

    for i, blk in enumerate(net.blocks):
        blk.register_forward_pre_hook(lambda m, a, i=i: snapshot(f"forward block{i}"))

        def after(m, a, out, i=i):
            if out.requires_grad:
                out.register_hook(lambda g, i=i: snapshot(f"backward block{i}"))
        blk.register_forward_hook(after)
    data = global_batches(steps, 1, 8 // strategy.dp_size, 16, 64)
    for s in range(steps):
        x, y = data[s, 0, :, :-1], data[s, 0, :, 1:]
        with strategy.micro_batch(fwd, last=True):
            _, loss = fwd(x, y)
            loss.backward()
        snapshot("after backward")
        with torch.no_grad():
            fwd(x)  # an evaluation forward (no backward follows) releases too
        snapshot("after no-grad forward")
    full = {k: sum(p.numel() * p.element_size() for p in m.parameters()) for k, m in units.items()}
    return {"log": log, "full": full}


def many(cases: list) -> list:
    """Run each case ({"fn": "mini_train" | "train" | "release_check", kwargs..., "load_case": i}) in these
    rank processes, in order; ``load_case`` feeds case i's checkpoint state (this rank's) to ``load``."""
    fns = {"mini_train": mini_train, "train": train, "release_check": release_check}
    results, kept = [], []
    for c in cases:
        c = dict(c)
        fn = fns[c.pop("fn")]
        if "load_case" in c:
            c["load"] = kept[c.pop("load_case")]
        r = fn(**c)
        kept.append(r.get("ckpt"))
        results.append(r)
    import torch.distributed as dist
    if dist.is_initialized() and dist.get_rank() != 0:  # rank 0's answers only (each rank's are equal)
        return [{k: v for k, v in r.items() if k in ("memory", "comm", "log", "full")} for r in results]
    return results


# ---- the runs (once per module) ----

CASES2 = [dict(fn="mini_train", parallel=p, optimizer=o, grad_clip=CLIP, memory=True, comm=True)
          for p in STAGES for o in OPTIMIZERS]
CASES2 += [
    dict(fn="train", parallel="zero3", optimizer="adamw", steps=2, total=4, save=True),              # 6
    dict(fn="train", parallel="zero1", optimizer="muon", steps=2, total=4, save=True),               # 7
    dict(fn="train", parallel="zero2", optimizer="adamw", start=2, steps=2, total=4, load_case=6),   # 8: 3 -> 2
    dict(fn="train", parallel="zero3", optimizer="muon", start=2, steps=2, total=4, load_case=7),    # 9: 1 -> 3
    dict(fn="release_check"),                                                                        # 10
    dict(fn="train", parallel="zero2", optimizer="muon", steps=1, total=1),                          # 11: comm
]
CASES2 += [dict(fn="mini_train", parallel="ddp", optimizer=o, grad_clip=CLIP) for o in OPTIMIZERS]  # 12, 13
MOE = {"moe.n_experts": 4, "moe.top_k": 2, "moe.d_expert": 16, "moe.aux_loss_coef": 0.0}  # (a balance loss is per rank)
VARIANTS = {  # other models and wrappers, each equal to one process
    "moe_muon_zero3": dict(fn="mini_train", parallel="zero3", optimizer="muon", grad_clip=CLIP, model=MOE),
    "moe_adamw_zero2": dict(fn="mini_train", parallel="zero2", optimizer="adamw", grad_clip=CLIP, model=MOE),
    "tied_zero3": dict(fn="mini_train", parallel="zero3", optimizer="adamw", grad_clip=CLIP,
                       model={"tie_embeddings": True}),
    "recompute_zero3": dict(fn="train", parallel="zero3", optimizer="muon", steps=2, total=2, recompute="full"),
}



@pytest.fixture(scope="module")
def two():
    ref_ckpt = train("none", "adamw", steps=2, total=4, save=True)["ckpt"]
    cases = CASES2 + [dict(fn="train", parallel="zero1", optimizer="adamw", start=2, steps=2, total=4,
                           load=ref_ckpt)]                                                            # 14: 1 proc -> 1
    cases += list(VARIANTS.values())                                                                  # 15...: VARIANTS
    return run_ranks(2, "test_parallel_zero:many", timeout=400, cases=cases)


@pytest.fixture(scope="module")
def refs():
    return {o: mini_train("none", optimizer=o, grad_clip=CLIP, memory=False) for o in OPTIMIZERS}


@pytest.fixture(scope="module")
def straight():
    """One process, 4 steps straight (what every resumed run must continue)."""
    return {o: train("none", o, steps=4, total=4) for o in OPTIMIZERS}


# ---- equal to one process ----

@pytest.mark.parametrize("opt", OPTIMIZERS)
@pytest.mark.parametrize("stage", STAGES)
def test_zero_equals_one_process(two, refs, stage, opt):
    ref = refs[opt]
    assert min(ref["gnorms"]) > CLIP, "clipping must act on every step for the test to mean something"
    got = two[0][CASES2.index(dict(fn="mini_train", parallel=stage, optimizer=opt, grad_clip=CLIP, memory=True, comm=True))]
    assert got["describe"]["strategy"] == stage and got["describe"]["dp_size"] == 2
    assert_same_training(ref, got)


@pytest.mark.parametrize("opt", OPTIMIZERS)
@pytest.mark.parametrize("stage", STAGES)
def test_zero_equals_ddp(two, stage, opt):
    ddp = two[0][CASES2.index(dict(fn="mini_train", parallel="ddp", optimizer=opt, grad_clip=CLIP))]
    assert ddp["describe"]["strategy"] == "ddp"
    got = two[0][CASES2.index(dict(fn="mini_train", parallel=stage, optimizer=opt, grad_clip=CLIP, memory=True, comm=True))]
    assert_same_training(ddp, got)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_zero_variants_equal_one_process(two, variant):
    """A MoE (stacked experts, a router; Muon on the experts' matrices), tied embeddings (one parameter in two
    ZeRO-3 units), activation recompute (blocks re-run their forward inside backward): equal to one process."""
    c = dict(VARIANTS[variant])
    got = two[0][len(CASES2) + 1 + list(VARIANTS).index(variant)]
    fn = c.pop("fn")
    c["parallel"] = "none"
    if fn == "mini_train":
        ref = mini_train(**c)
        assert_same_training(ref, got)
    else:
        c.pop("recompute")
        ref = train(**c)  # without recompute
        for a, b in zip(ref["losses"], got["losses"]):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (ref["losses"], got["losses"])
        for k, t in ref["state"].items():
            assert (got["state"][k] - t).abs().max() <= 1e-5, k


def test_zero_really_trains(refs):
    """The comparison can fail: the parameters moved, and Muon trains differently from AdamW."""
    a, m = refs["adamw"]["state"], refs["muon"]["state"]
    assert (a["blocks.0.attn.qkv.weight"] - m["blocks.0.attn.qkv.weight"]).abs().max() > 1e-3


# ---- memory: the partition's bytes ----

def _expected(stage: str, opt: str, world: int) -> dict:
    """The bytes of the flat per-parameter split on each of ``world`` ranks (fp32), from the shapes alone."""
    from lmforge.model.transformer import Transformer
    from lmforge.train.optim import param_groups

    torch.manual_seed(0)
    net = Transformer(tiny_config())
    hidden, _, _ = param_groups(net)
    muon = {id(p) for _, p in hidden} if opt == "muon" else set()
    pad = piece = optim = 0
    for p in net.parameters():
        s = math.ceil(p.numel() / world)
        pad += s * world * 4
        piece += s * 4
        optim += s * 4 if id(p) in muon else 2 * s * 4 + 4  # Muon: momentum; AdamW: m, v and a step
    return {"zero1": {"params": pad, "grads": pad, "optim": optim},
            "zero2": {"params": pad, "grads": piece, "optim": optim},
            "zero3": {"params": piece, "grads": piece, "optim": optim}}[stage]


def _one_process_optim_bytes(opt: str) -> int:
    from lmforge.model.transformer import Transformer
    from lmforge.train.optim import param_groups

    torch.manual_seed(0)
    net = Transformer(tiny_config())
    muon = {id(p) for _, p in param_groups(net)[0]} if opt == "muon" else set()
    return sum(p.numel() * 4 if id(p) in muon else 2 * p.numel() * 4 + 4 for p in net.parameters())


@pytest.mark.parametrize("opt", OPTIMIZERS)
@pytest.mark.parametrize("stage", STAGES)
def test_zero_memory_is_the_partition(two, stage, opt):
    i = CASES2.index(dict(fn="mini_train", parallel=stage, optimizer=opt, grad_clip=CLIP, memory=True, comm=True))
    exp = _expected(stage, opt, 2)
    for rank in (0, 1):
        assert two[rank][i]["memory"] == exp, (rank, two[rank][i]["memory"], exp)
    # every tensor here has an even size: the optimizer state is half of one process's, the AdamW step
    # counters aside (a 4-byte scalar per parameter on every rank)
    steps = 4 * _adam_held(opt)
    assert exp["optim"] - steps == (_one_process_optim_bytes(opt) - steps) // 2


@pytest.mark.parametrize("opt", OPTIMIZERS)
@pytest.mark.parametrize("stage", STAGES)
def test_zero_memory_matches_the_planner(two, stage, opt):
    """lmforge.parallel.plan's exact mode (from the shapes alone) agrees with the measured bytes on 2 ranks
    (every tensor here divides by 2; with padding the planner counts ZeRO-1/2's full parameters and ZeRO-1's
    gradients unpadded, these buffers are padded: see the 3-rank test)."""
    from lmforge.model.transformer import Transformer
    from lmforge.parallel.plan import state_bytes

    i = CASES2.index(dict(fn="mini_train", parallel=stage, optimizer=opt, grad_clip=CLIP, memory=True, comm=True))
    exp = state_bytes(Transformer(tiny_config()), stage, 2, optimizer=opt)
    for rank in (0, 1):
        assert two[rank][i]["memory"] == exp, (rank, two[rank][i]["memory"], exp)


def _adam_held(opt: str) -> int:
    from lmforge.model.transformer import Transformer
    from lmforge.train.optim import param_groups

    net = Transformer(tiny_config())
    return sum(1 for _ in net.parameters()) - (len(param_groups(net)[0]) if opt == "muon" else 0)


# ---- communication per step ----

def _psi(world: int, muon_only: bool = False) -> int:
    from lmforge.model.transformer import Transformer
    from lmforge.train.optim import param_groups

    net = Transformer(tiny_config())
    ps = [p for _, p in param_groups(net)[0]] if muon_only else list(net.parameters())
    return sum(math.ceil(p.numel() / world) * world for p in ps)


def test_zero_communication_per_step(two):
    psi, psi_muon = _psi(2), _psi(2, muon_only=True)
    z3 = two[0][6]["comm"]  # ZeRO-3, AdamW, grad_accum 2: gathers per micro-batch forward and backward
    for c in z3:
        assert c == {"all_reduce": 0, "reduce_scatter": psi, "all_gather": 2 * 2 * psi, "broadcast": 0}, c
    z1 = two[0][7]["comm"]  # ZeRO-1, Muon: all-reduce, the Muon matrices' updates gathered, then the parameters
    for c in z1:
        assert c == {"all_reduce": psi, "reduce_scatter": 0, "all_gather": psi + psi_muon, "broadcast": 0}, c
    z2 = two[0][11]["comm"]
    assert z2 == [{"all_reduce": 0, "reduce_scatter": psi, "all_gather": psi + psi_muon, "broadcast": 0}]
    z2a = two[0][8]["comm"]  # ZeRO-2, AdamW
    for c in z2a:
        assert c == {"all_reduce": 0, "reduce_scatter": psi, "all_gather": psi, "broadcast": 0}, c


@pytest.mark.parametrize("opt", OPTIMIZERS)
@pytest.mark.parametrize("stage", STAGES)
def test_zero_communication_seen_by_comm_counter(two, stage, opt):
    """lmforge.parallel.comm's dispatch-mode counter (which sees every c10d operator) finds the same
    per-step volumes as the strategy's own count: the ring volumes of the padded tensors, per rank."""
    i = CASES2.index(dict(fn="mini_train", parallel=stage, optimizer=opt, grad_clip=CLIP, memory=True, comm=True))
    psi, psi_muon, f = _psi(2), (_psi(2, muon_only=True) if opt == "muon" else 0), 1 / 2
    accum = 2
    exp = {"zero1": {"all_reduce": 2 * psi * f, "all_gather": (psi + psi_muon) * f},
           "zero2": {"reduce_scatter": psi * f, "all_gather": (psi + psi_muon) * f},
           "zero3": {"reduce_scatter": psi * f, "all_gather": (2 * accum * psi + psi_muon) * f}}[stage]
    for rank in (0, 1):
        summary = two[rank][i]["comm"]["summary"]
        got = {k: v["volume"] for k, v in summary.items() if isinstance(v, dict)}
        assert got == pytest.approx(exp), (rank, got, exp)


# ---- ZeRO-3 releases what it gathers ----

def test_zero3_releases_parameters_outside_their_unit(two):
    for rank in (0, 1):
        r = two[rank][10]
        full, log = r["full"], r["log"]
        seen = set()
        for event, held in log:
            seen.add(event)
            if event.startswith("after"):
                assert all(v == 0 for v in held.values()), (event, held)
            elif event.startswith("forward block"):
                i = int(event[-1])
                assert held[f"block{i}"] == full[f"block{i}"], (event, held)  # gathered whole
                assert held[f"block{1 - i}"] == 0, (event, held)  # the other block released
                for k in ("tok_emb", "norm_f", "lm_head"):  # the root's unit: whole across the forward
                    assert held[k] == full[k], (event, held)
            else:  # the backward of block i: it is gathered, the later block already released
                i = int(event[-1])
                assert held[f"block{i}"] == full[f"block{i}"], (event, held)
                for j in range(i + 1, 2):
                    assert held[f"block{j}"] == 0, (event, held)
                assert held["lm_head"] == 0, (event, held)  # released when its gradient was accumulated
        assert {"forward block0", "forward block1", "backward block0", "backward block1", "after backward",
                "after no-grad forward"} <= seen


# ---- checkpoints: get_state_dict's form, resumable across stages and one process ----

def test_zero_checkpoint_is_get_state_dicts_form(two):
    ref = train("none", "adamw", steps=2, total=4, save=True)["ckpt"]
    got = two[0][6]["ckpt"]  # ZeRO-3 after the same two steps
    assert isinstance(got["optim"], list) and len(got["optim"]) == 1  # one per optimizer (here one AdamW)
    got = {"model": got["model"], "optim": got["optim"][0]}
    assert set(got["model"]) == set(ref["model"])
    for k, t in ref["model"].items():
        assert got["model"][k].shape == t.shape
        assert (got["model"][k] - t).abs().max() <= 1e-5, k
    assert set(got["optim"]["state"]) == set(ref["optim"]["state"])
    for name, st in ref["optim"]["state"].items():
        assert set(got["optim"]["state"][name]) == set(st)
        for key, v in st.items():
            u = got["optim"]["state"][name][key]
            assert u.shape == v.shape, (name, key)
            assert (u.float() - v.float()).abs().max() <= 1e-5, (name, key)
    strip = [{k: v for k, v in g.items()} for g in ref["optim"]["param_groups"]]
    assert got["optim"]["param_groups"] == strip


@pytest.mark.parametrize("case,opt,what", [(8, "adamw", "zero3 -> zero2"), (9, "muon", "zero1 -> zero3"),
                                           (14, "adamw", "one process -> zero1")])
def test_zero_resumes_across_strategies(two, straight, case, opt, what):
    got, ref = two[0][case], straight[opt]
    for a, b in zip(ref["losses"][2:], got["losses"]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (what, ref["losses"], got["losses"])
    for k, t in ref["state"].items():
        assert (got["state"][k] - t).abs().max() <= 1e-5, (what, k)


@pytest.mark.parametrize("opt", OPTIMIZERS)
@pytest.mark.parametrize("stage", STAGES)
def test_zero_state_round_trip_changes_nothing(straight, stage, opt):
    """One rank (no process group): dcp_state -> load_dcp_state before every step, the first one included
    (an optimizer without state gives no entries and is not stepped to make them), leaves the run as it was."""
    got = train(stage, opt, steps=4, total=4, roundtrip=True)
    ref = straight[opt]
    for a, b in zip(ref["losses"], got["losses"]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (ref["losses"], got["losses"])
    for k, t in ref["state"].items():
        assert (got["state"][k] - t).abs().max() <= 1e-5, k


def test_one_process_resumes_from_zero3(two, straight):
    got = train("none", "adamw", start=2, steps=2, total=4, load=two[0][6]["ckpt"])
    ref = straight["adamw"]
    for a, b in zip(ref["losses"][2:], got["losses"]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (ref["losses"], got["losses"])


# ---- 3 ranks: every tensor padded ----

CASES3 = [dict(fn="mini_train", parallel=p, optimizer=o, global_b=6, steps=2, grad_clip=CLIP, memory=True)
          for p, o in (("zero1", "muon"), ("zero2", "adamw"), ("zero3", "muon"))]


@pytest.fixture(scope="module")
def three():
    return run_ranks(3, "test_parallel_zero:many", timeout=400, cases=CASES3)


def test_zero_three_ranks_padded(three):
    for c, got in zip(CASES3, three[0]):
        ref = mini_train("none", optimizer=c["optimizer"], global_b=6, steps=2, grad_clip=CLIP)
        assert_same_training(ref, got)
    from lmforge.model.transformer import Transformer
    from lmforge.parallel.plan import state_bytes

    for c, per_rank in zip(CASES3, zip(*three)):
        exp = _expected(c["parallel"], c["optimizer"], 3)
        assert exp == state_bytes(Transformer(tiny_config()), c["parallel"], 3, optimizer=c["optimizer"])  # padded
        for rank, r in enumerate(per_rank):
            assert r["memory"] == exp, (c, rank, r["memory"], exp)


# ---- bad input ----

def _one_rank(parallel="zero1", **cfg):
    from lmforge.parallel import make_strategy
    from lmforge.train.loop import LoopConfig

    return make_strategy(LoopConfig(parallel=parallel, max_steps=1, **cfg))


@pytest.mark.parametrize("stage", STAGES)
def test_zero_refuses_an_optimizer_it_cannot_shard(stage):
    from lmforge.model.transformer import Transformer

    s = _one_rank(stage)
    net = Transformer(tiny_config())
    s.wrap(net)
    with pytest.raises(ValueError, match=r"cannot shard the optimizer torch\.optim\.lbfgs\.LBFGS"):
        s.wrap_optimizers(net, [torch.optim.LBFGS(net.parameters())])


@pytest.mark.parametrize("cfg,match", [(dict(tp_size=2), "tp_size = 2"), (dict(cpu_offload=True), "cpu_offload"),
                                       (dict(fsdp_mixed_precision="bf16"), "fsdp_mixed_precision")])
def test_zero_bad_settings_are_named(cfg, match):
    from lmforge.model.transformer import Transformer

    with pytest.raises(ValueError, match=match):
        _one_rank("zero2", **cfg).check(Transformer(tiny_config()))


def test_zero_checkpoint_of_another_model_is_refused():
    from lmforge.model.transformer import Transformer
    from lmforge.train.optim import build_optimizers

    s = _one_rank("zero3")
    net = Transformer(tiny_config())
    s.wrap(net)
    opts = s.wrap_optimizers(net, build_optimizers(net, "adamw", fused=False))
    other = Transformer(tiny_config(d_ff=96))
    state = {"model": {k: v.detach() for k, v in other.state_dict().items()}, "optim": {}}
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp.*shape"):
        s.load_dcp_state(net, opts, state)
    state["model"].pop("tok_emb.weight")
    with pytest.raises(ValueError, match="missing.*tok_emb.weight"):
        s.load_dcp_state(net, opts, state)


def test_zero_partition_arithmetic():
    from lmforge.parallel.zero import Piece, split_sizes

    assert split_sizes(10, 3) == (4, 12) and split_sizes(12, 3) == (4, 12) and split_sizes(1, 4) == (1, 4)
    p = torch.nn.Parameter(torch.arange(10.0).view(2, 5))
    pieces = [Piece("w", p, r, 3) for r in range(3)]
    parts = [pc.mine(p) for pc in pieces]
    assert [x.tolist() for x in parts] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 0]]  # the last one padded
    assert torch.equal(pieces[0].unpad(torch.cat(parts)), p.detach())


@pytest.mark.parametrize("stage", STAGES)
def test_zero_refuses_a_second_wrap_and_foreign_tensors(stage):
    from lmforge.model.transformer import Transformer

    s = _one_rank(stage)
    net = Transformer(tiny_config())
    s.wrap(net)
    with pytest.raises(RuntimeError, match="wrap.. was already called"):
        s.wrap(net)
    stray = torch.nn.Parameter(torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"shape \(3, 5\) that is not a trained parameter"):
        s.wrap_optimizers(net, [torch.optim.AdamW([stray])])


def test_zero3_model_without_blocks_is_one_unit():
    """A model with no ``blocks``: the root is the only unit, gathered for forward and backward, released after."""
    torch.manual_seed(0)
    ref_net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    net.load_state_dict(ref_net.state_dict())
    s = _one_rank("zero3")
    s.wrap(net)
    (opt,) = s.wrap_optimizers(net, [torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)])
    ref_opt = torch.optim.SGD(ref_net.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(5, 4)
    for _ in range(3):
        for m, o, step in ((ref_net, ref_opt, lambda: ref_opt.step()), (net, opt, lambda: s.step([opt]))):
            with s.micro_batch(m, last=True):
                m(x).pow(2).sum().backward()
            step()
            s.zero_grad([opt]) if m is net else o.zero_grad()
        assert all(p.untyped_storage().nbytes() == 0 for p in net.parameters())
    full = s.full_state_dict(net)
    for k, t in ref_net.state_dict().items():
        assert torch.allclose(full[k], t, atol=1e-6), k
