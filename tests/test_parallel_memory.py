"""Per strategy on 2 ranks: the bytes each rank really holds (``Strategy.memory_bytes``) equal the
planner's exact figures (``plan.state_bytes``), and what the collectives move in a step
(``comm.CommCounter``) equals the theory (``comm.theoretical_volume``) in its exact, padded form."""
from __future__ import annotations

import importlib

import pytest

from parallel_harness import run_ranks

STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "fsdp", "tp", "tp+fsdp")
ACCUM = 2


def _cfg(name):
    return {"tp_size": 2} if name == "tp+fsdp" else None


def survey(strategies, optimizer: str, accum: int = ACCUM, model: dict | None = None, freeze: tuple = ()) -> dict:
    """On each rank: for each strategy, two steps of the tiny model; the measured and planned bytes
    after the last backward, and the last step's collectives."""
    import traceback

    import torch.distributed as dist

    from lmforge.model.transformer import Transformer
    from lmforge.parallel.plan import state_bytes
    from parallel_harness import mini_train, tiny_config

    out = {}
    for name in strategies:
        try:
            r = mini_train(name, steps=2, accum=accum, optimizer=optimizer, memory=True, comm=True, cfg=_cfg(name),
                           model=model, freeze=freeze)
            world, rank = dist.get_world_size(), dist.get_rank()
            net = Transformer(tiny_config(**(model or {})))
            for pname, p in net.named_parameters():
                if any(pname.startswith(f) for f in freeze):
                    p.requires_grad_(False)
            want = state_bytes(net, name, world, optimizer, tp=2, rank=rank)
            out[name] = {"memory": {k: r["memory"][k] for k in ("params", "grads", "optim")}, "want": want,
                         "comm": r["comm"], "losses": r["losses"]}
        except Exception:
            out[name] = {"error": traceback.format_exc()}
    return out


def _available():
    from lmforge.parallel import STRATEGIES as REG

    ok = []
    for name in STRATEGIES:
        mod = REG[name].split(":")[0]
        try:
            importlib.import_module(f"lmforge.parallel.{mod}")
            ok.append(name)
        except ImportError:
            pass
    return ok


# (optimizer, model overrides). The third: the embeddings tied to the head (one tensor, counted and gathered
# once), an odd vocabulary of 65 rows (FSDP2 pads them to 66, 33 per rank)
# and a MoE feed-forward of 4 experts, top 2 (TP replicates the experts; DDP finds unused parameters and
# all-reduces their "used" map)
CASES = {"adamw": ("adamw", None), "muon": ("muon", None),
         "tied-odd-moe": ("adamw", {"tie_embeddings": True, "vocab_size": 65,
                                    "moe": {"n_experts": 4, "top_k": 2, "d_expert": 48}})}


@pytest.fixture(scope="module", params=list(CASES))
def results(request):
    optimizer, model = CASES[request.param]
    got = run_ranks(2, "test_parallel_memory:survey", timeout=300, strategies=_available(), optimizer=optimizer,
                    model=model)
    return optimizer, model, got


@pytest.mark.parametrize("name", STRATEGIES)
def test_measured_equals_planned(results, name):
    optimizer, model, got = results
    if name not in got[0]:
        pytest.fail(f"{name}: no result from the ranks (its strategy module did not import?)")
    for rank, r in enumerate(got):
        res = r[name]
        assert "error" not in res, res.get("error")
        assert res["memory"] == res["want"], f"{name} / {optimizer}, rank {rank}: measured {res['memory']}, " \
                                             f"planned {res['want']}"


def _model(model: dict | None):
    from lmforge.model.transformer import Transformer
    from parallel_harness import tiny_config

    return Transformer(tiny_config(**(model or {})))


def _theory(name: str, optimizer: str, model: dict | None = None) -> dict:
    from lmforge.model.transformer import Transformer
    from lmforge.parallel.comm import padded_params, theoretical_volume
    from parallel_harness import tiny_config

    cfg = tiny_config(**(model or {}))
    pp = padded_params(Transformer(cfg), name, 2, tp=2, optimizer=optimizer)
    B = 8 if name in ("tp", "tp+fsdp") else 4  # TP ranks read the whole global batch of 8
    return theoretical_volume(name, pp["all"], 2, micro_batches=ACCUM, root_params=pp["root"],
                              act_elements=16 * B * cfg.d_model, n_layer=cfg.n_layer, muon_params=pp["muon"],
                              n_tensors=pp["tensors"] if name == "ddp" and cfg.moe else 0, tp=2,
                              tp_pairs=pp["tp_pairs"])


@pytest.mark.parametrize("name", STRATEGIES)
def test_counted_volume_equals_theory(results, name):
    optimizer, model, got = results
    if name not in got[0]:
        pytest.fail(f"{name}: no result from the ranks (its strategy module did not import?)")
    want = _theory(name, optimizer, model)
    for rank, r in enumerate(got):
        res = r[name]
        assert "error" not in res, res.get("error")
        s = res["comm"]["summary"]
        counted = {k: v["volume"] for k, v in s.items() if isinstance(v, dict)}
        if name == "ddp":  # DDP also broadcasts the model's buffers (rope's inv_freq) from rank 0 each step
            counted.pop("broadcast", None)
        assert counted == pytest.approx(want), f"{name} / {optimizer}, rank {rank}: counted {counted}, theory {want}"
        if name == "ddp":  # the DDP hook saw every gradient element once, as the dispatch mode did
            n = sum(p.numel() for p in _model(model).parameters())
            assert sum(res["comm"]["ddp_buckets"]) == n
            assert s["all_reduce"]["elements"] == n + (len(list(_model(model).parameters())) if model else 0)


def test_headline_volumes_of_the_paper():
    from lmforge.parallel.comm import theoretical_volume

    psi, N = 1e9, 64
    f = (N - 1) / N
    assert sum(theoretical_volume("ddp", psi, N, paper=True).values()) == pytest.approx(2 * psi * f)
    assert sum(theoretical_volume("zero1", psi, N, paper=True).values()) == pytest.approx(2 * psi * f)
    assert sum(theoretical_volume("zero2", psi, N, paper=True).values()) == pytest.approx(2 * psi * f)
    assert sum(theoretical_volume("zero3", psi, N, paper=True).values()) == pytest.approx(3 * psi * f)
    # lmforge's implementations with one micro-batch: ZeRO-1 moves one Ψ more than the paper's
    assert sum(theoretical_volume("zero1", psi, N).values()) == pytest.approx(3 * psi * f)
    assert sum(theoretical_volume("zero2", psi, N).values()) == pytest.approx(2 * psi * f)
    assert sum(theoretical_volume("zero3", psi, N).values()) == pytest.approx(3 * psi * f)
    assert sum(theoretical_volume("fsdp", psi, N).values()) == pytest.approx(3 * psi * f)
