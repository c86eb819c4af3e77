"""Mixture of experts: the routed forward against a dense reference loop (outputs and gradients), the
load-balancing and z-losses, the router metrics, and a MoE run of `lmforge pretrain` (its metric lines,
an exact resume, decoding its checkpoint with the engine)."""
import json
import os
import shutil

import pytest
import torch
from conftest import perturbed

from lmforge.cli import main
from lmforge.infer.engine import Engine
from lmforge.infer.fastpath import FastDecoder
from lmforge.infer.sampling import SamplingParams
from lmforge.model import load, preset
from lmforge.model.feedforward import MoE, router_losses
from lmforge.model.hf import HF_CLASSES
from lmforge.model.layers import ACTIVATION_FN
from lmforge.model.transformer import Transformer
from lmforge.train import train

from test_resume import Spy, assert_resumed_metrics, assert_resumed_run, records
from test_train import cfg_for, text_file  # noqa: F401  (text_file: a fixture)

# the MoE presets name their HF family; until lmforge exports it, a run that names it is refused up front
NO_EXPORT = {} if "mixtral" in HF_CLASSES else {"hf_family": "none"}
SMALL_MOE = {"n_layer": 2, "n_head": 2, "d_model": 32, "moe.d_expert": 32, **NO_EXPORT}


def reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The same layer the slow, obvious way: every expert runs on every token, masked by its top-k weight."""
    B, T, C = x.shape
    xf = x.reshape(-1, C)
    probs = torch.softmax(moe.router(xf), dim=-1, dtype=torch.float32)
    w, chosen = torch.topk(probs, moe.k, dim=-1)
    if moe.norm_topk:
        w = w / w.sum(-1, keepdim=True)
    out = torch.zeros_like(xf)
    for e in range(moe.E):
        gate = (w * (chosen == e)).sum(-1).to(x.dtype)  # (N,): e's weight for each token, 0 if not chosen
        h = ACTIVATION_FN[moe.activation](xf @ moe.w_in[e].t()) @ moe.w_out[e].t()
        out = out + gate[:, None] * h
    if moe.shared is not None:
        s = moe.shared(xf)
        if moe.shared_gate is not None:
            s = torch.sigmoid(moe.shared_gate(xf)) * s
        out = out + s
    return out.view(B, T, C)


def _moe_layer(name: str, **over) -> MoE:
    torch.manual_seed(0)
    m = Transformer(preset(name, **over))
    moe = m.blocks[0].mlp
    perturbed(moe, 0.05)  # off the init (zero-init projections would make every output 0)
    return moe.train()


@pytest.mark.parametrize("name,over,shape", [
    ("tiny-mixtral", {}, (3, 40, 128)),
    ("tiny-qwen2-moe", {}, (2, 33, 128)),  # shared experts + gate, top-k not renormalized
    ("shakespeare-moe", {}, (4, 64, 96)),
    ("tiny-mixtral", {"moe.top_k": 1, "moe.activation": "relu2"}, (2, 16, 128)),
    ("tiny-mixtral", {}, (1, 1, 128)),  # one token: two of the four experts get no tokens at all
])
def test_forward_and_gradients_equal_the_dense_reference(name, over, shape):
    moe = _moe_layer(name, **over)
    x = torch.randn(*shape, requires_grad=True)
    g = torch.randn(*shape)
    grads = []
    for fn in (moe.forward, lambda t: reference_moe(moe, t)):
        out = fn(x)
        ps = [x] + list(moe.parameters())
        grads.append((out.detach(), torch.autograd.grad(out, ps, g)))
    (a, ga), (b, gb) = grads
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    names = ["x"] + [n for n, _ in moe.named_parameters()]
    for n, u, v in zip(names, ga, gb):
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name} d/d{n}: {m}")


def _uniform_stats(E, k, N=64, L=2):
    """Router stats of L layers whose router scores every expert alike (zero logits)."""
    from lmforge.model.feedforward import RouterStats

    logits = torch.zeros(N, E)
    probs = torch.softmax(logits, -1)
    chosen = torch.stack([torch.randperm(E)[:k] for _ in range(N)])  # any choice: P is uniform
    load = torch.bincount(chosen.reshape(-1), minlength=E)
    return [RouterStats(logits, probs, chosen, load, i) for i in range(L)]


@pytest.mark.parametrize("E,k", [(4, 1), (4, 2), (8, 2), (6, 3)])
def test_load_balancing_loss_of_a_uniform_router(E, k):
    # E * sum_e f_e P_e with P_e = 1/E: sum_e f_e (summed over the k slots) = k, whatever the choices
    lb, z = router_losses(_uniform_stats(E, k), E, k)
    assert lb.item() == pytest.approx(k, abs=1e-6)
    assert z.item() == pytest.approx(torch.log(torch.tensor(float(E))).item() ** 2, rel=1e-6)  # logsumexp(0) = log E


def test_load_balancing_loss_grows_with_imbalance_and_masks_padding():
    from lmforge.model.feedforward import RouterStats

    E, k, N = 4, 2, 32
    logits = torch.tensor([8.0, 4.0, 0.0, 0.0]).repeat(N, 1)  # every token to experts 0 and 1
    probs = torch.softmax(logits, -1)
    chosen = torch.topk(probs, k).indices
    st = [RouterStats(logits, probs, chosen, torch.bincount(chosen.reshape(-1), minlength=E))]
    lb, _ = router_losses(st, E, k)
    assert lb.item() == pytest.approx(E * (probs[0, 0] + probs[0, 1]).item(), rel=1e-6)  # f = 1 on 0 (slot 0), 1 (slot 1)
    assert lb.item() > router_losses(_uniform_stats(E, k), E, k)[0].item()
    # padding tokens are left out: the masked half contributes nothing
    mixed = _uniform_stats(E, k, N=N, L=1)[0]
    cat = RouterStats(torch.cat([logits, mixed.logits]), torch.cat([probs, mixed.probs]),
                      torch.cat([chosen, mixed.chosen]), None)
    mask = torch.cat([torch.ones(N), torch.zeros(N)])
    lb_m, z_m = router_losses([cat], E, k, mask)
    lb_a, z_a = router_losses(st, E, k)
    assert lb_m.item() == pytest.approx(lb_a.item(), rel=1e-6) and z_m.item() == pytest.approx(z_a.item(), rel=1e-6)


def test_router_metrics_of_a_training_forward():
    torch.manual_seed(0)
    cfg = preset("tiny-mixtral", n_layer=3, moe_layers=[0, 2], **{"moe.z_loss_coef": 1e-3})
    m = Transformer(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (2, 24))
    _, loss = m(x, torch.roll(x, -1, 1))
    rm = m.router_metrics
    assert set(rm) == {"ce", "aux_loss", "z_loss", "expert_load"}
    assert rm["expert_load"].shape == (2, cfg.moe.n_experts)  # the two MoE layers
    torch.testing.assert_close(rm["expert_load"].sum(1), torch.ones(2))
    want = rm["ce"] + cfg.moe.aux_loss_coef * rm["aux_loss"] + cfg.moe.z_loss_coef * rm["z_loss"]
    torch.testing.assert_close(loss.detach(), want)
    assert rm["aux_loss"].item() >= cfg.moe.top_k - 1e-4  # the minimum (perfect balance) is top_k


def test_moe_active_params_match_the_dense_cpu_preset():
    dense, moe = preset("shakespeare-cpu"), preset("shakespeare-moe")
    assert abs(moe.num_active_params() / dense.num_active_params() - 1) < 0.02
    assert moe.num_params() > 1.5 * dense.num_params()


@pytest.fixture(scope="module")
def moe_run(text_file, tmp_path_factory):  # noqa: F811
    """`lmforge pretrain --preset shakespeare-moe` (its recipe: Muon, bigram init, weight average), small."""
    d = tmp_path_factory.mktemp("moe")
    run = d / "run"
    (d / "model.json").write_text(json.dumps({"model": SMALL_MOE}))  # (--set model.X takes top-level fields only)
    sets = ["tokenizer=char", "batch_size=4", "seq_len=32", "eval_every=3", "eval_batches=2", "log_every=2",
            "final_eval_batches=2", "peak_flops=1e11", "threads=1"]
    argv = ["pretrain", "--config", str(d / "model.json"), "--preset", "shakespeare-moe", "--text", str(text_file),
            "--max-steps", "6", "--out", str(run), "-q"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    return run


def test_pretrain_logs_the_moe_metrics(moe_run):
    cfg = json.loads((moe_run / "train_config.json").read_text())
    assert cfg["train"]["optimizer"] == "muon" and cfg["train"]["init"] == "bigram"  # the preset's recipe
    recs = [r for r in records(moe_run / "metrics.jsonl") if "event" not in r]
    logged = [r for r in recs if "tokens_per_s" in r]
    assert [r["step"] for r in logged] == [1, 2, 4, 6]
    E = cfg["model"]["moe"]["n_experts"]
    for r in logged:
        assert r["ce"] > 0 and r["aux_loss"] >= 2 - 1e-3 and r["z_loss"] > 0  # top_k = 2: the minimum
        if r["step"] == 1:  # later lines average the steps since the last line; step 1 is alone
            assert r["loss"] == pytest.approx(r["ce"] + 0.01 * r["aux_loss"], abs=1e-5)
        assert len(r["expert_load"]) == 2 and all(len(layer) == E for layer in r["expert_load"])
        for layer, hi, lo in zip(r["expert_load"], r["expert_load_max"], r["expert_load_min"]):
            assert sum(layer) == pytest.approx(1, abs=1e-3) and (hi, lo) == (max(layer), min(layer))
    assert all("ce" not in r for r in recs if "tokens_per_s" not in r)  # only on log lines
    assert any("val_bpb" in r for r in recs)


def test_engine_decodes_a_moe_checkpoint_like_a_full_forward_loop(moe_run):
    model, tok = load(moe_run)
    assert not FastDecoder.supported(model.eval())  # the C decode path declines MoE: PyTorch's is used
    prompts = [tok.encode("ROMEO.\n"), tok.encode("To be, or not")]
    for m in (model, perturbed(model, 0.05)):  # as trained (6 steps), then moved off it (an informative case)
        m.eval()
        want = []
        for p in prompts:
            ids = list(p)
            with torch.no_grad():
                for _ in range(12):
                    ids.append(int(m(torch.tensor([ids]))[0, -1].argmax()))
            want.append(ids[len(p):])
        got = Engine(m, num_blocks=32, block_size=4).generate(prompts, SamplingParams(max_tokens=12, temperature=0))
        assert got == want
    assert len(set(want[0])) > 1 or len(set(want[1])) > 1


def test_interrupted_and_resumed_moe_run_matches(text_file, tmp_path, monkeypatch):  # noqa: F811
    kw = dict(preset="shakespeare-moe", model=dict(SMALL_MOE), optimizer="muon", ema=0.8, ema_start=0.3,
              max_steps=8, log_every=2)
    spy = Spy(monkeypatch)
    ref = tmp_path / "ref"
    train(cfg_for(text_file, ref, **kw), quiet=True)
    cut = tmp_path / "cut"

    def die(step, rec):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(text_file, cut, **kw), on_step=die, quiet=True)
    before, inode = (cut / "metrics.jsonl").read_bytes(), os.stat(cut / "metrics.jsonl").st_ino
    ck_copy = shutil.copytree(cut / "checkpoints" / "step-0000005", tmp_path / "ck")
    train(cfg_for(text_file, cut, resume=True, **kw), quiet=True)
    assert_resumed_run(ref, cut, spy.runs[0], spy.runs[-1], ck_step=5, total=8)
    assert_resumed_metrics(cut, before, inode, 5, 8, ck_copy, loader_step=5)
    # the router metrics continue as the uninterrupted run's (the window restarts at the resume: step 6
    # averages step 6 alone there, steps 5-6 in the reference, so compare the lines after it)
    strip = ("elapsed", "tokens_per_s", "mfu")
    lines = lambda d: [{k: v for k, v in r.items() if k not in strip}  # noqa: E731
                       for r in records(d / "metrics.jsonl") if "event" not in r and r["step"] in (8,)]
    assert lines(cut) == lines(ref) and "expert_load" in lines(ref)[0]
