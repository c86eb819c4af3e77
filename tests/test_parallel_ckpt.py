"""Distributed checkpoints (lmforge.parallel.checkpoint): save on N ranks, resume at another world size
or strategy with the same subsequent losses and final weights as a run never interrupted; the
single-process format into a distributed run; damaged or foreign checkpoints refused on every rank;
consolidation to a model directory that lmforge.load and lmforge export open.

``ck_train`` is ``parallel_harness.mini_train`` with a weight average (the loop's third kind of
optimizer state), a save after ``save_at`` steps and a resume from a checkpoint.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from parallel_harness import global_batches, run_ranks, tiny_config

TOL = 1e-6  # another world size sums in another order (measured: ~1e-7 after 2 resumed steps)


def tiny_tokenizer():
    from lmforge.tokenize.char import CharTokenizer

    return CharTokenizer.train(["the quick brown fox jumps over a lazy dog.\n"], special_tokens=["<|endoftext|>"],
                               unk=".")


def full_training_state(strategy, net, saved: list) -> dict | None:
    """Every tensor a checkpoint holds (weights, optimizer states, weight average) whole, on rank 0, under
    the checkpoint's own keys ("model.<name>", "optim.<k>.<name>.<key>"); None on the other ranks."""
    from torch.distributed.tensor import DTensor

    from lmforge.parallel.checkpoint import _flatten, _strategy_state

    flat, _ = _flatten(_strategy_state(strategy, net, saved)[0], saved)
    out = {}
    for k in sorted(flat):
        t = flat[k]
        t = t.full_tensor() if isinstance(t, DTensor) else t
        out[k] = t.detach().cpu().clone()
    return out if strategy.is_main else None


def ck_train(parallel: str = "none", steps: int = 4, save_at: int | None = None, resume: str | None = None,
             run_dir: str | None = None, global_b: int = 8, accum: int = 2, T: int = 16, optimizer: str = "adamw",
             ema_start: int | None = 1, lr: float = 1e-2, grad_clip: float = 1.0, model: dict | None = None,
             seed: int = 0, single: bool = False, load_only: bool = False, tokenizer: bool = False,
             cfg: dict | None = None) -> dict:
    """Train the tiny model under ``parallel`` (resuming from ``resume``), saving after ``save_at`` steps
    (``single``: the single-process format; ``cfg``: more LoopConfig fields, e.g. tp_size). The weight average steps after step ``ema_start`` (None:
    no average). Returns losses and gradient norms of the steps run, the final weights and average
    (rank 0), the step it started at, and three draws of torch's RNG at the end."""
    from lmforge.model.transformer import Transformer
    from lmforge.parallel import make_strategy
    from lmforge.parallel.checkpoint import load_dist_checkpoint, save_dist_checkpoint, state_summary
    from lmforge.train.checkpoint import save_checkpoint
    from lmforge.train.loop import LoopConfig
    from lmforge.train.optim import WeightEMA, build_optimizers

    torch.set_num_threads(1)
    mcfg = tiny_config(**(model or {}))
    strategy = make_strategy(LoopConfig(parallel=parallel, max_steps=steps, **(cfg or {})))
    dp_rank, dp = strategy.dp_rank, strategy.dp_size
    B = global_b // dp
    strategy.cfg = LoopConfig(parallel=parallel, batch_size=B, grad_accum=accum, max_steps=steps,
                              grad_clip=grad_clip, optimizer=optimizer, lr=lr, **(cfg or {}))
    torch.manual_seed(seed)
    net = Transformer(mcfg)
    strategy.check(net)
    fwd = strategy.wrap(net)
    opts = strategy.wrap_optimizers(net, build_optimizers(net, optimizer, lr=lr, weight_decay=0.1, muon_lr=lr,
                                                          fused=False))
    ema = WeightEMA(strategy.ema_params(net), 0.5) if ema_start is not None else None
    saved = opts + ([ema] if ema is not None else [])
    start, info = 0, None
    if resume is not None:
        info = load_dist_checkpoint(resume, strategy, net, saved)
        start = info["step"]
    loaded = full_training_state(strategy, net, saved) if resume is not None else None
    summary = state_summary(strategy, net, saved) if resume is not None else None
    if load_only:
        return {"info": info, "loaded": loaded}
    data = global_batches(steps, accum, global_b, T, mcfg.vocab_size, seed)
    losses, gnorms, at_save, summary_at_save = [], [], None, None
    for s in range(start, steps):
        micro = data[s, :, dp_rank * B:(dp_rank + 1) * B]
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
        gnorms.append(strategy.clip_grad_norm(net, grad_clip))
        strategy.step(opts)
        strategy.zero_grad(opts)
        if ema is not None and s + 1 > ema_start:
            ema.step()
        if save_at == s + 1:
            state = {"step": s + 1, "tokens": (s + 1) * global_b * accum * T, "elapsed": 0.5,
                     "loader": {"step": s + 1}, "config": {"parallel": parallel}}
            tok = tiny_tokenizer() if tokenizer else None
            if single:
                save_checkpoint(run_dir, net, saved, state, tokenizer=tok)
            else:
                save_dist_checkpoint(run_dir, strategy, net, saved, state, tokenizer=tok)
            at_save = full_training_state(strategy, net, saved)
            summary_at_save = state_summary(strategy, net, saved)
    return {"losses": losses, "gnorms": gnorms, "state": strategy.full_state_dict(net),
            "final": full_training_state(strategy, net, saved),
            "start": start, "rng": torch.rand(3), "info": info, "at_save": at_save,
            "loaded": loaded, "summary_at_save": summary_at_save, "summary": summary}


def assert_restored(saved: dict, got: dict) -> None:
    """The state run ``got`` loaded is, tensor for tensor and bit for bit, the state run ``saved`` held
    when it saved, and ``state_summary`` says so (the same digests at both world sizes)."""
    at_save, loaded = saved["at_save"], got["loaded"]
    assert set(at_save) == set(loaded), sorted(set(at_save) ^ set(loaded))[:6]
    for k, t in at_save.items():
        assert loaded[k].dtype == t.dtype and torch.equal(loaded[k], t), f"{k}: restored differently"
    def digests(summary):  # (a strategy's own optimizer class, e.g. TPMuon for Muon, may differ)
        return [{k: v for k, v in o.items() if k != "name"} for o in summary]

    assert digests(saved["summary_at_save"]) == digests(got["summary"]), (saved["summary_at_save"], got["summary"])
    assert all(s["params_with_state"] > 0 for s in got["summary"][:1])


def assert_resumed(ref: dict, got: dict, start: int, tol: float = TOL) -> float:
    """``got`` (resumed at step ``start``) continues ``ref`` (never interrupted): same losses from ``start``,
    same final weights, optimizer states and weight average, same RNG; returns the largest difference
    seen."""
    assert got["start"] == start
    worst = 0.0
    assert len(got["losses"]) == len(ref["losses"]) - start
    for i, (a, b) in enumerate(zip(ref["losses"][start:], got["losses"])):
        worst = max(worst, abs(a - b))
        assert abs(a - b) <= tol * max(1.0, abs(a)), f"loss of step {start + i}: uninterrupted {a}, resumed {b}"
    assert set(ref["state"]) == set(got["state"])
    for name, t in ref["state"].items():
        err = (got["state"][name].float() - t.float()).abs().max().item()
        worst = max(worst, err)
        assert err <= tol, f"{name}: max |difference| {err:.3g} from the uninterrupted run"
    assert set(ref["final"]) == set(got["final"]), sorted(set(ref["final"]) ^ set(got["final"]))[:6]
    for key, t in ref["final"].items():  # the optimizers' states and the weight average too
        err = (got["final"][key].double() - t.double()).abs().max().item()
        worst = max(worst, err)
        assert err <= tol * max(1.0, t.double().abs().max().item()), f"{key}: max |difference| {err:.3g}"
    assert torch.equal(ref["rng"], got["rng"]), "the RNG was not restored"
    return worst


def sequence(runs: list[dict]) -> list:
    """``ck_train(**kw)`` for each ``kw`` in turn on this rank (one set of processes for several runs);
    ``kw["error"]``: load only and return the error it gives (``None`` if none)."""
    import torch.distributed as dist

    out = []
    for kw in runs:
        kw = dict(kw)
        if kw.pop("error", False):
            try:
                ck_train(load_only=True, **kw)
                out.append(None)
            except (ValueError, FileNotFoundError) as e:
                out.append(f"{type(e).__name__}: {e}")
        else:
            out.append(ck_train(**kw))
        if dist.is_initialized():
            dist.barrier()  # (every rank got here: none hangs in a collective the others left)
    return out


@pytest.fixture(scope="module")
def saved2(tmp_path_factory):
    """Checkpoints saved on 2 ranks after step 2 of 4: DDP and FSDP2 (with a tokenizer); (dir, the run)."""
    d = tmp_path_factory.mktemp("saved2")
    runs = [dict(parallel="ddp", save_at=2, run_dir=str(d / "ddp")),
            dict(parallel="fsdp", save_at=2, run_dir=str(d / "fsdp"), tokenizer=True)]
    ddp, fsdp = run_ranks(2, "test_parallel_ckpt:sequence", runs=runs)[0]
    return {"ddp": (d / "ddp", ddp), "fsdp": (d / "fsdp", fsdp)}


@pytest.fixture
def ddp_ck(saved2):
    return saved2["ddp"]


@pytest.fixture
def fsdp_ck(saved2):
    return saved2["fsdp"]


def _ck(run_dir: Path) -> Path:
    from lmforge.train.checkpoint import latest_checkpoint

    ck = latest_checkpoint(run_dir)
    assert ck is not None and ck.name == "step-0000002"
    return ck


# ---- one process ----

def test_layout_and_resume_one_process(tmp_path):
    from lmforge.parallel.checkpoint import is_dist_checkpoint

    whole = ck_train("none", save_at=2, run_dir=str(tmp_path))
    ck = _ck(tmp_path)
    assert is_dist_checkpoint(ck)
    names = sorted(p.name for p in ck.iterdir())
    assert names == ["config.json", "dcp", "trainer.json"], names
    assert (ck / "dcp" / ".metadata").exists() and list((ck / "dcp").glob("*.distcp"))
    tr = json.loads((ck / "trainer.json").read_text())
    assert tr["step"] == 2 and tr["loader"] == {"step": 2} and tr["saved_by"]["world_size"] == 1
    assert [o["class"] for o in tr["optimizers"]] == ["AdamW", "WeightEMA"]
    assert tr["optimizers"][1]["params_with_state"] > 0
    got = ck_train("none", resume=str(ck))
    assert got["info"]["step"] == 2 and got["info"]["elapsed"] == 0.5
    assert_restored(whole, got)
    assert_resumed(whole, got, 2, tol=0.0)  # the same process and world: bit for bit


def test_muon_and_an_average_not_started(tmp_path):
    """Muon + AdamW + a weight average with no state yet (saved empty, not stepped into being)."""
    ref = ck_train("none", optimizer="muon", ema_start=3, save_at=2, run_dir=str(tmp_path))
    tr = json.loads((_ck(tmp_path) / "trainer.json").read_text())
    assert [o["class"] for o in tr["optimizers"]] == ["Muon", "AdamW", "WeightEMA"]
    assert tr["optimizers"][2]["params_with_state"] == 0
    got = ck_train("none", optimizer="muon", ema_start=3, resume=str(_ck(tmp_path)))
    assert_resumed(ref, got, 2, tol=0.0)


def test_prune_and_crash_mid_save(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    from lmforge.parallel import checkpoint as pc
    from lmforge.train.checkpoint import latest_checkpoint

    ck_train("none", steps=3, save_at=1, run_dir=str(tmp_path))
    ck_train("none", steps=3, save_at=2, run_dir=str(tmp_path))
    ck_train("none", steps=3, save_at=3, run_dir=str(tmp_path))
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-0000002", "step-0000003"]  # keep=2

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(dcp, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        ck_train("none", steps=4, save_at=4, run_dir=str(tmp_path))
    assert latest_checkpoint(tmp_path).name == "step-0000003"  # the previous one stays latest
    assert not (root / "step-0000004").exists()
    monkeypatch.undo()
    ck_train("none", steps=4, save_at=4, run_dir=str(tmp_path))  # the leftover temporary is replaced
    assert latest_checkpoint(tmp_path).name == "step-0000004"
    assert not (root / ".tmp-step-0000004").exists()
    del pc


# ---- across world sizes and strategies ----

def test_ddp_2_ranks_resumes_on_1(ddp_ck):
    run_dir, whole = ddp_ck  # whole: the 2-rank run, saved after step 2 and never interrupted
    ck = _ck(run_dir)
    tr = json.loads((ck / "trainer.json").read_text())
    assert tr["saved_by"]["strategy"] == "ddp" and tr["saved_by"]["world_size"] == 2
    on1 = ck_train("none", resume=str(ck))
    assert_restored(whole, on1)
    print(f"ddp 2 -> 1 process: max difference {assert_resumed(whole, on1, 2):.2g}")


def test_fsdp_2_ranks_resumes_on_1(fsdp_ck):
    run_dir, whole = fsdp_ck
    ck = _ck(run_dir)
    tr = json.loads((ck / "trainer.json").read_text())
    assert tr["saved_by"]["strategy"] == "fsdp" and tr["saved_by"]["world_size"] == 2
    got = ck_train("none", resume=str(ck))
    assert_restored(whole, got)
    print(f"fsdp 2 -> 1 process: max difference {assert_resumed(whole, got, 2):.2g}")


# ---- bad checkpoints (on every rank: test_parallel_ckpt_ranks.py) ----

def _damaged_copies(ck: Path, tmp: Path) -> dict:
    trunc, gone, meta = tmp / "trunc" / ck.name, tmp / "gone" / ck.name, tmp / "meta" / ck.name
    for d in (trunc, gone, meta):
        shutil.copytree(ck, d)
    f = sorted((trunc / "dcp").glob("*.distcp"))[0]
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    sorted((gone / "dcp").glob("*.distcp"))[-1].unlink()
    m = meta / "dcp" / ".metadata"
    m.write_bytes(m.read_bytes()[:40])
    return {"truncated": trunc, "missing": gone, "metadata": meta}


def test_bad_checkpoints_one_process(tmp_path, fsdp_ck):
    from lmforge.parallel.checkpoint import load_dist_checkpoint

    ck = _ck(fsdp_ck[0])
    bad = _damaged_copies(ck, tmp_path)
    with pytest.raises(ValueError, match=r"dcp/__\d_0\.distcp is truncated"):
        ck_train("none", resume=str(bad["truncated"]), load_only=True)
    with pytest.raises(ValueError, match=r"dcp/__\d_0\.distcp is missing"):
        ck_train("none", resume=str(bad["missing"]), load_only=True)
    with pytest.raises(ValueError, match=r"cannot read dcp/.metadata"):
        ck_train("none", resume=str(bad["metadata"]), load_only=True)
    with pytest.raises(ValueError, match=r"parameter 'tok_emb.weight' has shape \(64, 32\) in the checkpoint, "
                       r"\(64, 48\) in this model"):
        ck_train("none", resume=str(ck), load_only=True, model={"d_model": 48, "n_head": 4, "n_kv_head": 2})
    with pytest.raises(ValueError, match="another model"):
        ck_train("none", resume=str(ck), load_only=True, model={"n_layer": 3})
    with pytest.raises(ValueError, match=r"saved with 2 optimizer state\(s\), this run has 3"):
        ck_train("none", resume=str(ck), load_only=True, optimizer="muon")
    with pytest.raises(ValueError, match=r"optimizer 0 \(AdamW in the checkpoint, Muon here\): 2 parameter groups"):
        ck_train("none", resume=str(ck), load_only=True, optimizer="muon", ema_start=None)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_dist_checkpoint(tmp_path / "nowhere", None, None, [])


# ---- consolidation and export ----

def _logits(model) -> torch.Tensor:
    x = torch.arange(12).view(2, 6) % 64
    with torch.no_grad():
        return model(x)[0]


def test_consolidate_opens_with_lmforge_load(tmp_path, fsdp_ck):
    import lmforge
    from lmforge.model.transformer import Transformer
    from lmforge.parallel.checkpoint import consolidate

    run_dir, whole = fsdp_ck
    out = consolidate(_ck(run_dir), tmp_path / "model")
    assert (out / "model.safetensors").exists() and (out / "config.json").exists() and not (out / "dcp").exists()
    lm = lmforge.load(str(out))
    model = lm.model
    assert lm.tokenizer.encode("a lazy fox") == tiny_tokenizer().encode("a lazy fox")
    expect = Transformer(tiny_config())  # the weights the FSDP run held when it saved
    expect.load_state_dict({k[len("model."):]: v for k, v in whole["at_save"].items() if k.startswith("model.")})
    for name, t in expect.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name
    assert torch.equal(_logits(model), _logits(expect))


def test_export_consolidates_a_dist_checkpoint(tmp_path, ddp_ck):
    from lmforge.cli import main

    ck = _ck(ddp_ck[0])
    rc = main(["export", "--checkpoint", str(ck), "--out", str(tmp_path / "hf")])
    assert rc == 0
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["architectures"] == ["LlamaForCausalLM"] and (tmp_path / "hf" / "model.safetensors").exists()
    assert sorted(p.name for p in ck.iterdir()) == ["config.json", "dcp", "trainer.json"]  # untouched


def test_tied_embeddings_resume_and_consolidate(tmp_path):
    import lmforge.model as lm
    from lmforge.parallel.checkpoint import consolidate

    tied = {"tie_embeddings": True}
    whole = ck_train("none", save_at=2, run_dir=str(tmp_path / "run"), model=tied, tokenizer=True)
    got = ck_train("none", resume=str(_ck(tmp_path / "run")), model=tied)
    assert_restored(whole, got)
    assert_resumed(whole, got, 2, tol=0.0)
    out = consolidate(_ck(tmp_path / "run"), tmp_path / "model")
    model, tok = lm.load(out)
    assert model.lm_head.weight is model.tok_emb.weight and tok is not None
    assert torch.equal(model.tok_emb.weight, whole["at_save"]["model.tok_emb.weight"])


def test_bad_paths(tmp_path):
    from lmforge.parallel.checkpoint import consolidate, is_dist_checkpoint, load_dist_checkpoint

    ck_train("none", steps=2, save_at=2, run_dir=str(tmp_path / "run"))
    ck = _ck(tmp_path / "run")
    with pytest.raises(ValueError, match="not a distributed checkpoint"):
        consolidate(tmp_path, tmp_path / "out")
    (ck / "trainer.json").unlink()
    with pytest.raises(FileNotFoundError, match="no trainer.json"):
        ck_train("none", resume=str(ck), load_only=True)
    assert is_dist_checkpoint(ck) and not is_dist_checkpoint(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "trainer.json").write_text("{}")
    with pytest.raises(ValueError, match="neither a distributed checkpoint"):
        load_dist_checkpoint(tmp_path / "empty", None, None, [])
