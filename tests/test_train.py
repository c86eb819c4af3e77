"""Pre-training (resume: tests/test_resume.py): NaN stop, optimizers, schedules, recompute, eval, export, CLI."""
import json
import math

import pytest
import torch

from lmforge.cli import main
from lmforge.model import load, make_config
from lmforge.model.transformer import Transformer
from lmforge.train import TrainConfig, train
from lmforge.train.optim import Muon, build_optimizers, newton_schulz
from lmforge.train.recompute import apply_recompute
from lmforge.train.schedule import lr_multiplier

TINY = {"n_layer": 2, "n_head": 2, "d_model": 32}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, corpus_texts):
    p = tmp_path_factory.mktemp("txt") / "plays.txt"
    p.write_text("".join(corpus_texts[:2])[:120_000])
    return p


def cfg_for(text_file, out, **kw):
    base = dict(out=str(out), text=str(text_file), tokenizer="char", preset="tiny", model=dict(TINY),
                batch_size=4, seq_len=32, max_steps=12, eval_every=4, eval_batches=2, warmup_steps=2,
                log_every=1, peak_flops=1e11, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def test_weight_ema_ends_on_the_average(text_file, tmp_path):
    """The run ends on decay-weighted averages of the weights after each step from ema_start on."""
    from lmforge.train.optim import WeightEMA

    snaps = []
    run = tmp_path / "run"

    real_step = WeightEMA.step

    def spy(self, closure=None):
        snaps.append([p.detach().clone() for g in self.param_groups for p in g["params"]])
        return real_step(self, closure)

    WeightEMA.step = spy
    try:
        train(cfg_for(text_file, run, ema=0.5, ema_start=0.5, eval_every=0), quiet=True)
    finally:
        WeightEMA.step = real_step
    assert len(snaps) == 7  # after steps 6..12
    avg = [t.clone() for t in snaps[0]]
    for s in snaps[1:]:
        avg = [0.5 * a + 0.5 * w for a, w in zip(avg, s)]
    model, _ = load(run)
    for a, p in zip(avg, model.parameters()):
        assert torch.allclose(a, p, atol=1e-6)
    with pytest.raises(ValueError, match="ema must be in"):
        train(cfg_for(text_file, tmp_path / "bad", ema=1.0), quiet=True)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(text_file, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(cfg_for(text_file, run, max_steps=4), quiet=True)
    from lmforge.train.trainer import NaNLossError

    real = Transformer.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None, **kw):
        out = real(self, idx, targets, **kw)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] >= 3:
                return out[0], out[1] * float("nan")
        return out

    monkeypatch.setattr(Transformer, "forward", poisoned)
    with pytest.raises(NaNLossError, match="loss became nan at step 7"):
        train(cfg_for(text_file, run, max_steps=8, checkpoint_every=1, resume=True), quiet=True)
    after = {p.name: (p / "model.safetensors").read_bytes() for p in (run / "checkpoints").glob("step-*")}
    assert "step-0000006" in after and all(math.isfinite(v) for v in _weights(run / "checkpoints/step-0000006"))


def _weights(d):
    from safetensors.torch import load_file

    return [float(t.float().abs().sum()) for t in load_file(str(d / "model.safetensors")).values()]


def test_bounds_and_inputs_are_checked(text_file, tmp_path):
    with pytest.raises(ValueError, match="give a bound"):
        train(cfg_for(text_file, tmp_path, max_steps=0))
    with pytest.raises(ValueError, match="exactly one of data"):
        train(cfg_for(text_file, tmp_path, data=str(tmp_path)))
    with pytest.raises(ValueError, match="longer than the model's max_seq_len"):
        train(cfg_for(text_file, tmp_path / "x", seq_len=64, model={**TINY, "max_seq_len": 32}))


def test_max_time_bound(text_file, tmp_path):
    r = train(cfg_for(text_file, tmp_path, max_steps=0, max_time=1.5, eval_every=0), quiet=True)
    assert 1.5 <= r["elapsed"] < 15 and r["step"] > 1  # stops at the first step past 1.5 s (slack: shared CI)


def test_train_on_shards_and_eval_cli(tmp_path, corpus_files, capsys):
    from lmforge import tokenize
    from lmforge.data.prepare import make_config, prepare

    tok = tokenize.train("bpe", [str(p) for p in corpus_files[:4]], 400,
                         special_tokens=["<|endoftext|>", "<|bos|>"], show_progress=False)
    tok.save(tmp_path / "tok.json")
    prepare(make_config([str(p) for p in corpus_files[:6]], None, ["workers=1", "shards.val_fraction=0.2"]),
            tmp_path / "tok.json", tmp_path / "data", quiet=True)
    cfg = TrainConfig(out=str(tmp_path / "run"), data=str(tmp_path / "data"), preset="tiny", model=dict(TINY),
                      batch_size=4, seq_len=32, max_steps=6, eval_every=3, eval_batches=2, peak_flops=1e11,
                      loader="bos")
    r = train(cfg, quiet=True)
    assert r["val_bpb"] > 0 and math.isfinite(r["val_loss"])
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--json", "--seq-len", "32"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"loss", "perplexity", "bits_per_byte"} <= set(ev)
    assert abs(ev["bits_per_byte"] - ev["loss"] * ev["tokens"] / ev["bytes"] / math.log(2)) < 1e-6
    text = tmp_path / "t.txt"
    text.write_text(corpus_files[0].read_text()[:5000])
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--text", str(text), "--json"]) == 0
    ev2 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev2["bytes"] == 5000 and ev2["bits_per_byte"] > 0
    # export to HF and load with transformers
    transformers = pytest.importorskip("transformers")
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours, _ = load(tmp_path / "run")
    ids = torch.randint(0, 400, (2, 16))
    with torch.no_grad():
        assert (hf(ids).logits - ours.eval()(ids)).abs().max() < 1e-4


# ---- optimizers, schedules, recompute ------------------------------------------------------------

def test_newton_schulz_orthogonalizes():
    torch.manual_seed(0)
    G = torch.randn(64, 32)
    X = newton_schulz(G)
    s = torch.linalg.svdvals(X)
    assert s.min() > 0.5 and s.max() < 1.3  # the quintic lands singular values near 1, not exactly
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    assert torch.nn.functional.cosine_similarity(X.flatten(), (U @ Vh).flatten(), dim=0) > 0.95


def test_optimizer_groups_cover_each_parameter_once():
    m = Transformer(make_config(vocab_size=50, n_layer=2, n_head=2, d_model=32, mlp="swiglu", norm="rmsnorm",
                                pos="rope", tie_embeddings=False))
    for kind in ("adamw", "muon"):
        opts = build_optimizers(m, kind)
        ids = [id(p) for o in opts for g in o.param_groups for p in g["params"]]
        assert len(ids) == len(set(ids)) == len({id(p) for p in m.parameters()})
    muon, adam = build_optimizers(m, "muon")
    assert isinstance(muon, Muon) and all(p.dim() == 2 for g in muon.param_groups for p in g["params"])
    assert m.tok_emb.weight in adam.param_groups[0]["params"]
    decay, no_decay = build_optimizers(m, "adamw")[0].param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_matches_torch(fused):
    from lmforge.train.optim import AdamW, _cpu_fused_adamw

    if fused and not _cpu_fused_adamw():
        major, minor = (int(v) for v in torch.__version__.split(".")[:2])
        assert (major, minor) < (2, 4), "torch >= 2.4 has a fused CPU AdamW; lmforge failed to use it"
        pytest.skip("no fused CPU AdamW before torch 2.4")
    torch.manual_seed(0)
    ps = [torch.randn(5, 3), torch.randn(7)]
    ours = [torch.nn.Parameter(p.clone()) for p in ps]
    ref = [torch.nn.Parameter(p.clone()) for p in ps]
    groups = lambda q: [{"params": [q[0]], "weight_decay": 0.1}, {"params": [q[1]], "weight_decay": 0.0}]
    a = AdamW(groups(ours), lr=3e-2, betas=(0.9, 0.95), eps=1e-8, fused=fused)
    b = torch.optim.AdamW(groups(ref), lr=3e-2, betas=(0.9, 0.95), eps=1e-8, fused=fused)
    for step in range(6):
        g = [torch.randn_like(p) for p in ps]
        for q, r, gi in zip(ours, ref, g):
            q.grad, r.grad = gi.clone(), gi.clone()
        for opt in (a, b):
            opt.param_groups[0]["lr"] = 3e-2 * (1 - step / 10)  # a schedule changes lr between steps
            opt.step()
        for q, r in zip(ours, ref):
            if fused:
                assert torch.equal(q, r)  # the same kernel
            else:
                assert torch.allclose(q, r, atol=1e-6, rtol=1e-6)
    # the state is torch's: a checkpoint of one loads into the other
    b2 = torch.optim.AdamW(groups(ref), lr=3e-2, fused=fused)
    b2.load_state_dict(a.state_dict())
    assert torch.equal(b2.state[ref[0]]["exp_avg"], a.state[ours[0]]["exp_avg"])


def test_schedules():
    assert lr_multiplier(0.0, 0, "cosine", warmup_steps=10) == pytest.approx(0.1)
    assert lr_multiplier(0.0, 10, "cosine", warmup_steps=10) == pytest.approx(1.0)
    assert lr_multiplier(1.0, 100, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_multiplier(0.5, 100, "cosine", min_ratio=0.0) == pytest.approx(0.5)
    assert lr_multiplier(0.7, 100, "wsd", decay_frac=0.2) == 1.0
    assert lr_multiplier(0.9, 100, "wsd", decay_frac=0.2, min_ratio=0.0) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        lr_multiplier(0.5, 1, "linear")


@pytest.mark.parametrize("policy", ["full", "every:2", "selective"])
def test_recompute_gives_identical_gradients(policy):
    cfg = make_config(vocab_size=64, n_layer=3, n_head=2, d_model=32, mlp="swiglu", norm="rmsnorm", pos="rope")
    torch.manual_seed(0)
    a = Transformer(cfg)
    b = Transformer(cfg)
    b.load_state_dict(a.state_dict())
    apply_recompute(b, policy)
    x = torch.randint(0, 64, (2, 16))
    for m in (a, b):
        m.train()
        _, loss = m(x, x)
        loss.backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-5), n
    with pytest.raises(ValueError, match="recompute policy"):
        apply_recompute(b, "some")


def test_cli_help(capsys):
    for cmd in (["pretrain", "--help"], ["eval", "--help"], ["export", "--help"], ["model", "info", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(cmd)
        assert e.value.code == 0
    assert main(["model", "info", "gpt2-124m", "--json"]) == 0
    d = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert d["params"] == 124_439_808  # GPT-2 small with tied embeddings
    assert main(["pretrain", "--text", "nope.txt", "--max-steps", "1", "--out", "/tmp/x", "--set", "lr=fast"]) == 2
    assert "lr: expected a number" in capsys.readouterr().err


def _markov_tokens(V=12, n=6000, seed=0, sample_seed=None):
    """n tokens of a random Markov chain: ``seed`` picks the chain, ``sample_seed`` (default: the same
    stream) the walk through it, so a different ``sample_seed`` gives unseen text of the same chain."""
    g = torch.Generator().manual_seed(seed)
    P = torch.softmax(torch.randn(V, V, generator=g) * 2.5, 1)
    if sample_seed is not None:
        g = torch.Generator().manual_seed(sample_seed)
    t = [0]
    for _ in range(n - 1):
        t.append(int(torch.multinomial(P[t[-1]], 1, generator=g)))
    return torch.tensor(t).numpy()


def test_bigram_init_starts_as_the_smoothed_bigram_model():
    from lmforge.train.ngram_init import bigram_init, bigram_log_probs

    V = 12
    tokens = _markov_tokens(V)
    cfg = make_config(vocab_size=V, n_layer=2, n_head=2, d_model=32, max_seq_len=64, norm="rmsnorm",
                      norm_bias=False, pos="rope", tie_embeddings=False, zero_init_proj=True, arch="none")
    m = Transformer(cfg).eval()
    torch.manual_seed(5)
    before = torch.rand(3)
    torch.manual_seed(5)
    info = bigram_init(m, tokens, scale=0.5)
    assert torch.equal(torch.rand(3), before)  # the caller's random stream is untouched
    assert info["rank"] == V  # d - 1 >= V: the factorization is exact
    assert torch.allclose(m.tok_emb.weight.pow(2).mean(1).sqrt(), torch.full((V,), 0.5), atol=1e-5)
    logp, n = bigram_log_probs(tokens, V)
    assert torch.allclose(logp.exp().sum(1), torch.ones(V), atol=1e-5) and int(n.sum()) == len(tokens) - 1
    x = torch.from_numpy(tokens[:64]).long()[None]
    with torch.no_grad():
        got = torch.log_softmax(m(x), -1)[0]
    assert torch.allclose(got, logp[x[0]], atol=2e-4)  # each prediction is the bigram row of its token
    # training from it: a bigram init beats a fresh start on held-out text of the same chain
    held = torch.from_numpy(_markov_tokens(V, 1025, seed=0, sample_seed=1)).long()  # a walk training never saw
    fresh = Transformer(cfg).eval()
    with torch.no_grad():
        l_init = torch.nn.functional.cross_entropy(m(held[None, :-1])[0], held[1:])
        l_fresh = torch.nn.functional.cross_entropy(fresh(held[None, :-1])[0], held[1:])
    assert l_init < l_fresh - 0.5


def test_bigram_init_refuses_models_it_cannot_start():
    from lmforge.train.ngram_init import bigram_init

    tokens = _markov_tokens(12, 100)
    with pytest.raises(ValueError, match="tied embeddings.*learned"):
        bigram_init(Transformer(make_config(vocab_size=12, n_layer=1, n_head=2, d_model=16, max_seq_len=32,
                                            zero_init_proj=True)), tokens)
    cfg = make_config(vocab_size=8, n_layer=1, n_head=2, d_model=16, max_seq_len=32, norm="rmsnorm",
                      pos="rope", tie_embeddings=False, zero_init_proj=True)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        bigram_init(Transformer(cfg), tokens)


def test_trainer_bigram_init(text_file, tmp_path):
    model = dict(TINY, norm="rmsnorm", norm_bias=False, pos="rope", tie_embeddings=False, zero_init_proj=True,
                 arch="none")
    runs = {}
    for init in ("default", "bigram"):
        runs[init] = train(cfg_for(text_file, tmp_path / init, model=model, init=init, max_steps=1, eval_every=0),
                           quiet=True)
    assert runs["bigram"]["val_bpb"] < runs["default"]["val_bpb"] - 1.0
    with pytest.raises(ValueError, match="init: expected one of default, bigram"):
        train(cfg_for(text_file, tmp_path / "bad", init="trigram"), quiet=True)
