"""The preference stage end to end (``lmforge.align.dpo``, ``lmforge dpo``).

References: the first step's loss is DPO's sigmoid loss computed here from the base model's own logits
(completion tokens only, render's format); a precomputed reference gives the losses a frozen copy gives
(1e-6) and the LoRA reference is the adapters-disabled forward, which equals the base's; a run
interrupted and resumed ends equal to an uninterrupted one; dropout is zero in policy and reference while
training; sigmoid, ipo, kto, simpo and orpo lower their loss on a separable toy set; the output
directory loads with ``lmforge.model.load`` and chats. Bad input fails naming the field and value, or is
counted in final.json's ``dpo.data``.
"""
import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import perturbed

from lmforge import tokenize
from lmforge.align import dpo as dpo_mod
from lmforge.align.dpo import DPOConfig, DPOStage, check_config, dpo, dropout_values
from lmforge.model import load, make_config, save
from lmforge.model.transformer import Transformer
from lmforge.tokenize.chat import render
from lmforge.tokenize.special import default_special_tokens

CTX = 96
QS = ["Is the sky blue?", "Is fire cold?", "Is water wet?", "Is ice hot?", "Do fish swim?", "Do stones fly?",
      "Is snow white?", "Is coal white?", "Are cats animals?", "Are rocks alive?", "Is two even?", "Is three even?"]


def pair_rows():
    rows = []
    for k, q in enumerate(QS):
        good, bad = ("Yes, it is so.", "No.") if k % 2 == 0 else ("No, it is not.", "Yes.")
        rows.append({"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": good}],
                     "rejected": [{"role": "assistant", "content": bad}]})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok(corpus_files):
    return tokenize.train("bpe", [str(corpus_files[0])], 400, special_tokens=default_special_tokens("bpe"),
                          show_progress=False)


def tiny(tok, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = make_config(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64,
                      max_seq_len=CTX, norm="rmsnorm", mlp="swiglu", pos="rope", tie_embeddings=False, arch="llama",
                      **kw)
    return perturbed(Transformer(cfg), 0.2, seed=seed)


@pytest.fixture(scope="module")
def base(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo") / "base"
    save(tiny(tok, dropout=0.1), d, tokenizer=tok)  # a dropout the stage must switch off
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("dpodata") / "pairs.jsonl", pair_rows())


def cfg_for(base, data_file, out, **kw):
    c = dict(base=str(base), out=str(out), data=[str(data_file)], val_frac=0.0, batch_size=4, seq_len=CTX, max_steps=3,
             lr=1e-3, warmup_steps=0, eval_every=0, log_every=1, threads=1, device="cpu", export_hf=False, seed=3,
             shuffle=False)
    c.update(kw)
    return DPOConfig(**c)


def step_lines(out):
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()
            if "event" not in json.loads(ln)]


def seq_logp(model, tok, prompt, completion):
    """Summed log-prob of the completion's tokens (its assistant turn to <|end|>) after the prompt, from the
    model's full logits over render's ids."""
    p = render(tok, prompt, add_generation_prompt=True)[0]
    ids = render(tok, prompt + completion)[0]
    x = torch.tensor([ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(x)[0].double(), -1)
    return sum(float(lp[t - 1, ids[t]]) for t in range(len(p), len(ids)))


# ---- the loss is DPO's, from the model's own logits -----------------------------------------------

def test_first_step_loss_is_sigmoid_dpo_from_the_logits(base, data, tok, tmp_path):
    model, _ = load(base)
    model.eval()
    for m in model.modules():  # (the reference: dropout off, as the stage runs it)
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    rows = pair_rows()[:4]
    out = tmp_path / "r"
    # the policy starts at the base (the reference): log-ratios 0, the loss log 2 exactly; the logged
    # logps are the completion sums computed here from the full logits
    final = dpo(cfg_for(base, data, out, max_steps=1, batch_size=4), quiet=True)
    rec = step_lines(out)[0]
    assert rec["loss"] == pytest.approx(math.log(2), abs=1e-6)
    want_c = sum(seq_logp(model, tok, r["prompt"], r["chosen"]) for r in rows) / 4
    want_r = sum(seq_logp(model, tok, r["prompt"], r["rejected"]) for r in rows) / 4
    assert rec["logps/chosen"] == pytest.approx(want_c, abs=1e-4)
    assert rec["logps/rejected"] == pytest.approx(want_r, abs=1e-4)
    assert rec["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert final["dpo"]["reference"] == "precomputed"
    assert (out / "ref_logps.json").exists()


def test_reference_precomputed_equals_copy_and_lora_is_the_base(base, data, tmp_path):
    runs = {}
    for ref in ("precomputed", "copy"):
        out = tmp_path / ref
        dpo(cfg_for(base, data, out, reference=ref, max_steps=4), quiet=True)
        runs[ref] = step_lines(out)
    for a, b in zip(runs["precomputed"], runs["copy"]):
        for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert a[k] == pytest.approx(b[k], abs=1e-6), k
    assert runs["copy"][-1]["loss"] != pytest.approx(math.log(2), abs=1e-3)  # (the steps moved the policy)
    # LoRA: the adapters-disabled forward is the base's, whatever the adapter holds
    from lmforge.align.lora import LoRAConfig, adapters_disabled, apply_lora, lora_parameters

    m0, _ = load(base)
    m1, _ = load(base)
    m0.eval(), m1.eval()
    apply_lora(m1, LoRAConfig(r=4, alpha=8))
    with torch.no_grad():
        for p in lora_parameters(m1):
            p.normal_(0, 0.3)
    x = torch.randint(0, m0.cfg.vocab_size, (2, 17))
    with torch.no_grad():
        y0, y1 = m0(x), m1(x)
        with adapters_disabled(m1):
            y2 = m1(x)
        y3 = m1(x)
    assert not torch.allclose(y0, y1, atol=1e-3)
    assert torch.equal(y0, y2)
    assert torch.equal(y1, y3)  # (back on after the block)
    # and a LoRA run with the lora reference starts at log 2 (policy == reference) and trains
    out = tmp_path / "lora"
    dpo(cfg_for(base, data, out, reference="lora", lora_r=4, max_steps=3), quiet=True)
    recs = step_lines(out)
    assert recs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert recs[-1]["loss"] < recs[0]["loss"]


# ---- every method trains ----------------------------------------------------------------------------

@pytest.mark.parametrize("method,loss", [("dpo", "sigmoid"), ("dpo", "ipo"), ("kto", "kto"), ("simpo", "simpo"),
                                         ("orpo", "sigmoid")])
def test_methods_lower_their_loss_on_a_separable_set(base, data, tmp_path, method, loss):
    out = tmp_path / f"{method}-{loss}"
    cfg = cfg_for(base, data, out, method=method, loss_type=[loss], max_steps=8, lr=3e-3,
                  beta=0.5 if method != "orpo" else 0.1, batch_size=4 if method != "kto" else 8)
    final = dpo(cfg, quiet=True)
    recs = step_lines(out)
    losses = [r["loss"] for r in recs]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses
    if method != "kto":
        assert recs[-1]["rewards/margins"] > recs[0]["rewards/margins"]
    assert final["dpo"]["method"] == method
    assert final["dpo"]["reference"] == ("none" if method in ("simpo", "orpo") else
                                         "copy" if method == "kto" else "precomputed")


# ---- dropout off, resume, the output directory --------------------------------------------------------

def test_dropout_is_off_in_policy_and_reference(base, data, tmp_path):
    m, _ = load(base)
    assert max(dropout_values(m)) == pytest.approx(0.1)  # (the base has dropout: the test can fail)
    seen = []

    def spy(step, rec):
        seen.append((dropout_values(stage_box[0].model), dropout_values(stage_box[0].ref_model)))

    stage_box = []
    orig = DPOStage.__init__

    def grab(self, *a, **k):
        orig(self, *a, **k)
        stage_box.append(self)

    DPOStage.__init__ = grab
    try:
        dpo(cfg_for(base, data, tmp_path / "d", reference="copy", max_steps=2), quiet=True, on_step=spy)
    finally:
        DPOStage.__init__ = orig
    assert len(seen) == 2
    for pol, ref in seen:
        assert pol and ref and max(pol) == 0.0 and max(ref) == 0.0
    assert stage_box[0].model.cfg.dropout == 0.0
    # and with dropout off, two forwards in train mode agree (no stochastic op left)
    pol = stage_box[0].ref_model
    pol.train()
    x = torch.randint(0, pol.cfg.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(pol(x), pol(x))


@pytest.mark.parametrize("reference", ["precomputed", "copy"])
def test_interrupted_and_resumed_run_matches(base, data, tmp_path, reference):
    kw = dict(reference=reference, max_steps=5, checkpoint_every=2, val_frac=0.0, shuffle=True, batch_size=4,
              log_every=3)
    full = tmp_path / "full"
    dpo(cfg_for(base, data, full, **kw), quiet=True)
    cut = tmp_path / "cut"

    class Stop(Exception):
        pass

    def die(step, rec):
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        dpo(cfg_for(base, data, cut, **kw), quiet=True, on_step=die)
    dpo(cfg_for(base, data, cut, resume=True, **kw), quiet=True)
    strip = lambda r: {k: v for k, v in r.items() if k not in ("elapsed", "tokens_per_s")}  # noqa: E731
    a, b = [strip(r) for r in step_lines(full)], [strip(r) for r in step_lines(cut)]
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], abs=1e-6), (ra["step"], k)
    ma, _ = load(full)
    mb, _ = load(cut)
    for (n, p), (_, q) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_output_directory_loads_and_chats(base, data, tok, tmp_path):
    out = tmp_path / "o"
    final = dpo(cfg_for(base, data, out, max_steps=2, val_frac=0.34, eval_every=1, export_hf=True), quiet=True)
    from lmforge.infer.loop import generate
    from lmforge.model import load_tokens

    m, t = load(out)
    spec = load_tokens(out, t)
    assert spec.chat_template and t.vocab_size == tok.vocab_size
    ids = render(t, [{"role": "user", "content": "Is the sky blue?"}], add_generation_prompt=True)[0]
    reply = generate(m, ids, 8, temperature=0.0, stop=spec.stop)
    assert isinstance(t.decode(reply), str) and len(reply) >= 1
    assert (out / "hf" / "config.json").exists() and (out / "margins.png").exists() and (out / "loss.png").exists()
    d = final["dpo"]
    assert d["val_pairs"] > 0 and set(d["val"]) >= {"loss", "rewards/margins", "rewards/accuracies"}
    recs = step_lines(out)
    assert all(k in recs[0] for k in ("rewards/chosen", "rewards/rejected", "rewards/margins",
                                      "rewards/accuracies", "logps/chosen", "logps/rejected", "val_rewards/margins"))
    s = dpo_mod.margin_series(out / "metrics.jsonl", final)
    assert len(s["train rewards/margins"]) == 2 and s["val rewards/accuracies"]


# ---- bad input ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,msg", [
    (dict(beta=0.0), "beta: must be > 0"), (dict(beta=-1.0), "got -1.0"),
    (dict(label_smoothing=0.5), "label_smoothing: expected a value in [0, 0.5)"),
    (dict(label_smoothing=-0.1), "label_smoothing"),
    (dict(reference="lora"), "needs a LoRA run: set lora_r > 0"),
    (dict(lora_r=8, lora_dropout=1.5), "lora_dropout: expected a probability in [0, 1), got 1.5"),
    (dict(reference="frozen"), "reference: expected one of precomputed, copy, lora, got 'frozen'"),
    (dict(method="ppo"), "method: expected one of"),
    (dict(data=[]), "data: no preference data"),
    (dict(base=""), "base: give the model"),
    (dict(loss_type=[]), "loss_type"),
    (dict(loss_type=["sigmod"]), "did you mean 'sigmoid'"),
    (dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0]), "loss_weights"),
])
def test_bad_settings_name_the_field(base, data, tmp_path, kw, msg):
    c = cfg_for(base, data, tmp_path / "x")
    for k, v in kw.items():
        setattr(c, k, v)
    with pytest.raises(ValueError) as e:
        check_config(c)
    assert msg in str(e.value)


def test_dropped_pairs_are_counted_and_all_dropped_is_an_error(base, tok, tmp_path):
    rows = pair_rows()[:6]
    rows[0] = {**rows[0], "rejected": rows[0]["chosen"]}  # identical
    rows[1] = {**rows[1], "prompt": [{"role": "user", "content": "word " * 200}]}  # longer than the context
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    final = dpo(cfg_for(base, f, tmp_path / "a", max_steps=1), quiet=True)
    st = final["dpo"]["data"]["train"]
    assert st["identical"] == 1 and st["prompt_too_long"] == 1 and st["kept"] == 4
    bad = write_jsonl(tmp_path / "b.jsonl", [{**r, "rejected": r["chosen"]} for r in pair_rows()[:3]])
    with pytest.raises(ValueError) as e:
        dpo(cfg_for(base, bad, tmp_path / "b", max_steps=1), quiet=True)
    assert "every training pair was dropped" in str(e.value) and "'identical': 3" in str(e.value)


def test_same_object_and_tokenizer_mismatch_are_refused(base, data, tok, corpus_files, tmp_path):
    m, _ = load(base)
    with pytest.raises(ValueError, match="ref_model: the same object as model"):
        dpo(cfg_for(base, data, tmp_path / "s", reference="copy"), quiet=True, model=m, ref_model=m)
    other = tokenize.train("bpe", [str(corpus_files[0])], 380, special_tokens=default_special_tokens("bpe"),
                           show_progress=False)
    od = tmp_path / "other"
    save(tiny(other), od, tokenizer=other)
    with pytest.raises(ValueError) as e:
        dpo(cfg_for(base, data, tmp_path / "t", ref=str(od), reference="copy"), quiet=True)
    assert str(od) in str(e.value) and str(base) in str(e.value) and "differs" in str(e.value)


def test_python_api_model_objects(base, data, tmp_path):
    m, _ = load(base)
    r, _ = load(base)
    final = dpo(cfg_for(base, data, tmp_path / "api", reference="copy", max_steps=2), quiet=True, model=m,
                ref_model=r)
    assert final["step"] == 2 and final["dpo"]["reference"] == "copy"


# ---- the command line ----------------------------------------------------------------------------------

def parser():
    from lmforge.align._cli import add_dpo_parser

    p = argparse.ArgumentParser(prog="lmforge")
    add_dpo_parser(p.add_subparsers(dest="cmd"))
    return p


def test_cli_help_and_flags(base, data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["dpo", "--help"])
    h = capsys.readouterr().out
    for flag in ("--base", "--data", "--loss", "--loss-weights", "--beta", "--label-smoothing", "--method",
                 "--reference", "--max-steps", "--out", "--resume", "--config", "--pairs-from-tasks"):
        assert flag in h, flag
    from lmforge.align._cli import _dpo_config

    a = parser().parse_args(["dpo", "--base", str(base), "--data", str(data), "--loss", "robust", "--loss", "ipo",
                             "--loss-weights", "0.8,0.2", "--beta", "0.2", "--label-smoothing", "0.1",
                             "--max-steps", "2", "--out", str(tmp_path / "c"), "--set", "threads=1"])
    cfg = _dpo_config(a)
    assert cfg.loss_type == ["robust", "ipo"] and cfg.loss_weights == [0.8, 0.2] and cfg.beta == 0.2
    assert cfg.label_smoothing == 0.1 and cfg.data == [str(data)]
    from lmforge._config import UsageError

    with pytest.raises(UsageError, match="beta"):
        a = parser().parse_args(["dpo", "--base", str(base), "--data", str(data), "--beta", "0"])
        dpo_mod_cmd(a)


def dpo_mod_cmd(a):
    from lmforge.align._cli import cmd_dpo

    return cmd_dpo(a)


# ---- the reference's log-probs enter the loss; KTO precomputed; packed rows; generated pairs ----------------

def test_a_separate_reference_gives_the_sigmoid_loss_of_both_models(base, data, tok, tmp_path):
    """With a reference of other weights (same tokenizer), step 1's loss, rewards and margins are
    -logsigmoid(beta ((c - c_ref) - (r - r_ref))) from both models' full logits, computed here."""
    rd = tmp_path / "ref"
    save(tiny(tok, seed=5), rd, tokenizer=tok)
    pol, _ = load(base)
    ref, _ = load(rd)
    for m in (pol, ref):
        m.eval()
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
    rows, beta = pair_rows()[:4], 0.3
    lc = torch.tensor([seq_logp(pol, tok, r["prompt"], r["chosen"]) for r in rows])
    lr = torch.tensor([seq_logp(pol, tok, r["prompt"], r["rejected"]) for r in rows])
    rc = torch.tensor([seq_logp(ref, tok, r["prompt"], r["chosen"]) for r in rows])
    rr = torch.tensor([seq_logp(ref, tok, r["prompt"], r["rejected"]) for r in rows])
    want = -F.logsigmoid(beta * ((lc - rc) - (lr - rr))).mean()
    for reference in ("precomputed", "copy"):
        out = tmp_path / reference
        dpo(cfg_for(base, data, out, ref=str(rd), reference=reference, beta=beta, max_steps=1), quiet=True)
        rec = step_lines(out)[0]
        assert rec["loss"] == pytest.approx(float(want), abs=1e-5), reference
        assert rec["rewards/chosen"] == pytest.approx(float(beta * (lc - rc).mean()), abs=1e-5)
        assert rec["rewards/margins"] == pytest.approx(float(beta * ((lc - rc) - (lr - rr)).mean()), abs=1e-5)
    assert json.loads((tmp_path / "precomputed" / "ref_logps.json").read_text())["reference"] == str(rd)


def test_kto_with_a_precomputed_reference_and_no_kl(base, data, tmp_path):
    a, b = tmp_path / "pre", tmp_path / "copy"
    kw = dict(method="kto", loss_type=["kto"], kto_kl=False, batch_size=6, max_steps=3, beta=0.5)
    fa = dpo(cfg_for(base, data, a, reference="precomputed", **kw), quiet=True)
    fb = dpo(cfg_for(base, data, b, reference="copy", **kw), quiet=True)
    assert fa["dpo"]["reference"] == "precomputed" and fb["dpo"]["reference"] == "copy"
    assert fa["dpo"]["pairs"] == 2 * len(QS)  # (each pair: a desirable and an undesirable example)
    for ra, rb in zip(step_lines(a), step_lines(b)):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6)
        assert ra["kl"] == 0.0
    assert step_lines(a)[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # policy == reference: 1 - sigmoid(0)


def test_packed_rows_give_the_padded_losses(base, data, tmp_path):
    runs = {}
    for packing in ("padded", "packed"):
        out = tmp_path / packing
        dpo(cfg_for(base, data, out, packing=packing, reference="copy", max_steps=3), quiet=True)
        runs[packing] = step_lines(out)
    for a, b in zip(runs["padded"], runs["packed"]):
        for k in ("loss", "rewards/margins", "logps/chosen"):
            assert a[k] == pytest.approx(b[k], abs=1e-5), k


def test_pairs_generated_first(base, tmp_path, monkeypatch):
    import lmforge.align.pairs as pairs

    seen = {}

    def planted(model, tok, tokens, tasks=(), **kw):
        seen.update(tasks=list(tasks), kw=kw, training=model.training)
        return pair_rows(), [], {"planted": {"prompts": len(QS), "pairs": len(QS)}}

    monkeypatch.setattr(pairs, "make_pairs", planted)
    out = tmp_path / "gen"
    final = dpo(cfg_for(base, tmp_path / "unused", out, data=[], pairs={"tasks": ["letter_count"], "n": 5},
                        max_steps=1), quiet=True)
    assert seen["tasks"] == ["letter_count"] and seen["kw"] == {"n": 5}
    assert final["dpo"]["data"]["pairs"]["planted"]["pairs"] == len(QS)
    assert len((out / "pairs.jsonl").read_text().splitlines()) == len(QS) and final["dpo"]["pairs"] == len(QS)
    monkeypatch.setattr(pairs, "make_pairs", lambda *a, **k: ([], [], {"letter_count": {"pairs": 0}}))
    with pytest.raises(ValueError, match="generated pairs per task"):
        dpo(cfg_for(base, tmp_path / "unused", tmp_path / "none", data=[], pairs={"tasks": ["letter_count"]},
                    max_steps=1), quiet=True)


@pytest.mark.parametrize("packing", ["padded", "packed"])
def test_orpo_nll_covers_the_chosen_prompt_and_completion(base, data, tok, tmp_path, packing):
    """TRL's ORPO NLL: the token mean of the chosen rows' every token after the first (prompt included)."""
    pol, _ = load(base)
    pol.eval()
    for mod in pol.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    total, n = 0.0, 0
    for r in pair_rows()[:4]:
        ids = render(tok, r["prompt"] + r["chosen"])[0]
        x = torch.tensor([ids])
        with torch.no_grad():
            lp = torch.log_softmax(pol(x)[0].double(), -1)
        total += sum(float(lp[t - 1, ids[t]]) for t in range(1, len(ids)))
        n += len(ids) - 1
    out = tmp_path / "orpo"
    dpo(cfg_for(base, data, out, method="orpo", loss_type=["sigmoid"], max_steps=1, packing=packing), quiet=True)
    rec = step_lines(out)[0]
    assert rec["nll_loss"] == pytest.approx(-total / n, abs=1e-5)


def test_cli_runs_and_resumes_from_its_config(base, data, tmp_path, capsys):
    from lmforge.align._cli import cmd_dpo

    out = tmp_path / "cli"
    a = parser().parse_args(["dpo", "--base", str(base), "--data", str(data), "--loss", "sigmoid,sft",
                             "--loss-weights", "1,0.5", "--max-steps", "2", "--out", str(out), "--no-export",
                             "--batch-size", "4", "--seq-len", str(CTX), "--set", "threads=1", "--set", "val_frac=0",
                             "--quiet"])
    assert cmd_dpo(a) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["step"] == 2 and first["dpo"]["loss_type"] == ["sigmoid", "sft"]
    a = parser().parse_args(["dpo", "--config", str(out / "train_config.json"), "--resume", "--max-steps", "3",
                             "--quiet"])
    assert cmd_dpo(a) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["step"] == 3 and final["resumed_from_step"] == 2 and final["steps_this_run"] == 1
    assert final["dpo"]["ref_logps"] == "read from ref_logps.json"


def test_empty_completion_names_the_line_or_is_counted(base, tmp_path):
    rows = pair_rows()[:5]
    rows[2] = {**rows[2], "chosen": [{"role": "assistant", "content": ""}]}
    f = write_jsonl(tmp_path / "e.jsonl", rows)
    with pytest.raises(ValueError, match=r"e\.jsonl:3: chosen\[0\]\.content: empty completion"):
        dpo(cfg_for(base, f, tmp_path / "r", max_steps=1), quiet=True)
    final = dpo(cfg_for(base, f, tmp_path / "s", max_steps=1, on_error="skip"), quiet=True)
    assert final["dpo"]["data"]["read"][str(f)]["skipped"] == {"empty_completion": 1}
    assert final["dpo"]["pairs"] == 4
