"""The SFT stage end to end (``lmforge.align.sft``, ``lmforge sft``).

References: the first step's loss is the mean cross-entropy over the assistant's tokens computed here
from ``chat.render`` and the base model's own logits (every packing mode, with and without gradient
accumulation); a run interrupted and resumed ends bit-identical to an uninterrupted one; the HF export
of a fine-tuned model, through transformers' ``apply_chat_template`` + greedy ``generate``, answers with
the token ids ``lmforge.infer``'s chat gives; a LoRA run trains only the adapter and its merged model
equals the adapter model. Bad input (a conversation file's faults, an over-long conversation, a LoRA
pattern that matches nothing, a base without chat tokens) fails with the file, line and field, or is
counted.
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import perturbed

from lmforge import tokenize
from lmforge.align.sft import SFTConfig, SFTStage, check_config, sft
from lmforge.model import load, load_tokens, make_config, save
from lmforge.model.transformer import Transformer
from lmforge.tokenize.chat import END, render
from lmforge.tokenize.special import default_special_tokens

CTX = 128

CONVS = [
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who art thou?"},
     {"role": "assistant", "content": "A player, my lord."}],
    [{"role": "user", "content": "Reverse: abc"}, {"role": "assistant", "content": "cba"},
     {"role": "user", "content": "And xyz?"}, {"role": "assistant", "content": "zyx"}],
    [{"role": "user", "content": "Count the letter r in 'strawberry'."}, {"role": "assistant", "content": "3"}],
    [{"role": "user", "content": "Sort: 3 1 2"}, {"role": "assistant", "content": "1 2 3"}],
    [{"role": "user", "content": "Are the brackets (()) balanced?"}, {"role": "assistant", "content": "yes"}],
    [{"role": "user", "content": "Say something of Denmark."},
     {"role": "assistant", "content": "Something is rotten in the state of Denmark."}],
    [{"role": "user", "content": "What is 10 - 4?"}, {"role": "assistant", "content": "6"}],
]


def write_jsonl(path, convs):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
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
    d = tmp_path_factory.mktemp("sft") / "base"
    save(tiny(tok), d, tokenizer=tok)
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("sftdata") / "convs.jsonl", CONVS)


def cfg_for(base, data, out, **kw):
    c = dict(base=str(base), out=str(out), sources=[{"path": str(data)}], val_frac=0.0, batch_size=4,
             seq_len=CTX, max_steps=4, lr=3e-3, warmup_steps=0, eval_every=0, log_every=1, threads=1,
             device="cpu", export_hf=False, seed=7)
    c.update(kw)
    return SFTConfig(**c)


def lines(out):
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def step_lines(out):
    return [r for r in lines(out) if "event" not in r and "loss" in r]


def reference_loss(model, tok, convs) -> tuple[float, int]:
    """Mean CE over every conversation's assistant tokens (and their <|end|>): each token predicted from
    the conversation's own prefix, straight from ``render`` and the model's logits."""
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for c in convs:
            ids, mask = render(tok, c)
            x = torch.tensor([ids])
            logits = model(x)[0, :-1].double()
            keep = torch.tensor(mask[1:], dtype=torch.bool)
            total += F.cross_entropy(logits[keep], x[0, 1:][keep], reduction="sum").item()
            n += int(keep.sum())
    return total / n, n


# ---- the loss is the assistant-only mean CE, whatever the packing --------------------------------

@pytest.mark.parametrize("packing,accum", [("bfd", 1), ("none", 1), ("padding_free", 1), ("grouped", 1),
                                           ("none", 2), ("padding_free", 4), ("grouped", 2)])
def test_first_step_loss_is_mean_ce_over_assistant_tokens(base, data, tok, tmp_path, packing, accum):
    cfg = cfg_for(base, data, tmp_path / "run", packing=packing, batch_size=len(CONVS) // accum, grad_accum=accum,
                  max_steps=1)
    stage = SFTStage(cfg)
    assert len(stage.batches) == accum  # one step covers every conversation
    final = sft(cfg)
    want, n = reference_loss(load(base)[0], tok, CONVS)
    rec = step_lines(tmp_path / "run")[0]
    assert abs(rec["loss"] - want) < 1e-5, (rec["loss"], want)
    assert rec["trained_tokens"] == n
    assert final["sft"]["trained_tokens"] == n and final["sft"]["conversations"] == len(CONVS)


def test_conversation_norm_is_mean_of_means(base, data, tok, tmp_path):
    cfg = cfg_for(base, data, tmp_path / "run", packing="bfd", batch_size=len(CONVS), max_steps=1,
                  loss_norm="conversation")
    sft(cfg)
    model = load(base)[0]
    per = [reference_loss(model, tok, [c])[0] for c in CONVS]
    assert abs(step_lines(tmp_path / "run")[0]["loss"] - sum(per) / len(per)) < 1e-5


# ---- a run end to end: a model directory, an HF export that chats alike --------------------------

@pytest.fixture(scope="module")
def trained(base, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sftrun") / "run"
    cfg = cfg_for(base, data, out, max_steps=12, val_frac=0.25, eval_every=6, sample_every=6, export_hf=True,
                  packing="bfd", batch_size=2)
    final = sft(cfg, quiet=True)
    return out, final


def test_run_writes_a_chat_model_directory(trained, tok):
    out, final = trained
    recs = step_lines(out)
    assert [r["step"] for r in recs] == list(range(1, 13))
    assert recs[-1]["loss"] < recs[0]["loss"]  # it learns the (repeated) training conversations
    assert "val_loss" in recs[5] and "sample" in recs[5]
    assert math.isfinite(final["val_loss"]) and final["test_loss"] is None
    assert final["sft"]["conversations"] + final["sft"]["val_conversations"] == len(CONVS)
    assert final["sft"]["val_conversations"] >= 1 and final["sft"]["epochs"] > 0
    assert json.loads((out / "final.json").read_text()) == final
    assert json.loads((out / "train_config.json").read_text())["sft"]["lr"] == 3e-3
    model, tok2 = load(out)
    spec = load_tokens(out, tok2)
    assert spec.template == "lmforge" and spec.stop[0] == tok.special_tokens[END]
    assert spec.pad is None or spec.pad not in spec.stop  # the model learns to stop; pad never looks like a stop
    assert (out / "loss.png").exists() and (out / "hf" / "tokenizer_config.json").exists()
    tc = json.loads((out / "hf" / "tokenizer_config.json").read_text())
    from lmforge.tokenize.chat import CHAT_TEMPLATE

    assert tc["chat_template"] == CHAT_TEMPLATE  # the generation markers: TRL's assistant mask works on it


def test_hf_export_chats_like_lmforge(trained):
    """transformers' apply_chat_template(add_generation_prompt=True) + greedy generate on OUT/hf gives the
    token ids lmforge.infer's chat gives on OUT (what `lmforge chat --checkpoint OUT` answers)."""
    transformers = pytest.importorskip("transformers")
    from conftest import assert_informative

    import lmforge

    out, _ = trained
    lm = lmforge.load(out)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "hf", attn_implementation="eager").eval()
    convs = [[{"role": "user", "content": "What is 2 + 3?"}],
             [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who art thou?"}],
             [{"role": "user", "content": "Reverse: abc"}, {"role": "assistant", "content": "cba"},
              {"role": "user", "content": "And xyz?"}]]
    stop = lm.tokens.stop
    outs = []
    for c in convs:
        ids = hf_tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert ids == lm.encode_chat(c)
        x = torch.tensor([ids])
        with torch.no_grad():
            g = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                            eos_token_id=stop, pad_token_id=stop[0])[0, len(ids):].tolist()
        ours = lm.chat(c, max_tokens=12, temperature=0.0).token_ids
        assert g == ours, c
        outs.append(g)
    assert_informative(outs)


# ---- exact resume --------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(packing="bfd", grad_accum=2), dict(packing="none", neftune_alpha=5.0)])
def test_interrupted_and_resumed_run_matches(base, data, tmp_path, kw):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    # (peak_flops given: measuring it draws random matrices after the checkpoint's RNG is restored, which
    # moves NEFTune's noise; a loop issue reported to h18-loop)
    c = dict(max_steps=8, batch_size=2, val_frac=0.25, eval_every=4, peak_flops=1e12, **kw)
    sft(cfg_for(base, data, ref, **c), quiet=True)

    def die(step, rec):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sft(cfg_for(base, data, cut, **c), on_step=die, quiet=True)
    with pytest.raises(ValueError, match="--resume"):
        sft(cfg_for(base, data, cut, **c), quiet=True)
    sft(cfg_for(base, data, cut, resume=True, **c), quiet=True)

    def strip(r):
        return {k: v for k, v in r.items() if k not in ("elapsed", "tokens_per_s", "mfu", "trained_tokens_per_s")}

    assert [strip(r) for r in step_lines(cut)] == [strip(r) for r in step_lines(ref)]
    a, b = load(ref)[0].state_dict(), load(cut)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    fr, fc = (json.loads((d / "final.json").read_text()) for d in (ref, cut))
    assert fc["resumed_from_step"] == 3 and fc["steps_this_run"] == 5
    assert fc["sft"]["epochs"] == fr["sft"]["epochs"] and fc["val_loss"] == fr["val_loss"]


# ---- LoRA ----------------------------------------------------------------------------------------

def test_lora_trains_only_the_adapter_and_merges_exactly(base, data, tmp_path):
    out = tmp_path / "lora"
    final = sft(cfg_for(base, data, out, lora_r=4, lora_alpha=8.0, max_steps=6, export_hf=True,
                        test_sources=[{"path": str(data)}]), quiet=True)
    assert final["sft"]["lora"]["adapted"] > 0 and math.isfinite(final["test_loss"])
    assert (out / "adapter" / "adapter_config.json").exists()
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    b0, merged = load(base)[0], load(out)[0]
    changed = [k for k, v in b0.state_dict().items() if not torch.equal(v, merged.state_dict()[k])]
    assert changed and all(k.startswith("blocks.") for k in changed)  # embeddings, head, norms: frozen
    # the merged directory's logits equal the base + the saved adapter's
    from lmforge.align.lora import load_peft

    with_adapter = load(base)[0]
    load_peft(with_adapter, out / "adapter")
    x = torch.tensor([render(load(out)[1], CONVS[1])[0]])
    with torch.no_grad():
        assert torch.allclose(with_adapter.eval()(x), merged.eval()(x), atol=1e-5)
    ck = json.loads((out / "train_config.json").read_text())["sft"]
    assert ck["lr"] == 3e-3 and ck["lora_r"] == 4
    # PEFT reads the adapter onto the base's HF export: its logits are those of OUT/hf (the merged export)
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from lmforge.model.hf import export_hf

    m, t = load(base)
    base_hf = export_hf(m, tmp_path / "base_hf", tokenizer=t, tokens=load_tokens(base, t))
    auto = transformers.AutoModelForCausalLM
    theirs = peft.PeftModel.from_pretrained(auto.from_pretrained(base_hf, attn_implementation="eager"),
                                            str(out / "adapter")).eval()
    merged_hf = auto.from_pretrained(out / "hf", attn_implementation="eager").eval()
    with torch.no_grad():
        a, b = theirs(x).logits, merged_hf(x).logits
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def test_lora_pattern_that_matches_nothing(base, data, tmp_path):
    with pytest.raises(ValueError, match="nomatch"):
        sft(cfg_for(base, data, tmp_path / "x", lora_r=4, lora_targets=["nomatch"]), quiet=True)
    assert not (tmp_path / "x" / "checkpoints").exists()


# ---- bad input -----------------------------------------------------------------------------------

BAD = {
    "unknown role": {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]},
    "two system": {"messages": [{"role": "system", "content": "a"}, {"role": "system", "content": "b"},
                                {"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]},
    "empty assistant": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
    "non-string content": {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
}


@pytest.mark.parametrize("what", sorted(BAD))
def test_bad_conversation_names_file_and_line(base, tmp_path, what):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"messages": CONVS[0]}) + "\n" + json.dumps(BAD[what]) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2") as e:
        sft(cfg_for(base, p, tmp_path / "run"), quiet=True)
    assert "message" in str(e.value) or "content" in str(e.value) or "role" in str(e.value)
    assert not (tmp_path / "run" / "final.json").exists()


def test_bad_conversations_skipped_and_counted(base, tmp_path):
    p = write_jsonl(tmp_path / "mixed.jsonl", CONVS[:4])
    with open(p, "a") as f:
        for v in BAD.values():
            f.write(json.dumps(v) + "\n")
    final = sft(cfg_for(base, p, tmp_path / "run", on_error="skip", max_steps=1), quiet=True)
    (st,) = final["sft"]["sources"].values()
    assert st["skipped"] == len(BAD) and st["used"] == 4
    assert final["sft"]["conversations"] == 4


@pytest.mark.parametrize("policy", ["truncate", "skip"])
def test_overlong_conversation_is_counted(base, tok, tmp_path, policy):
    long = [{"role": "user", "content": "Tell a long tale."},
            {"role": "assistant", "content": " ".join(["the king is dead, long live the king"] * 40)}]
    assert len(render(tok, long)[0]) > CTX
    p = write_jsonl(tmp_path / "long.jsonl", CONVS + [long])
    final = sft(cfg_for(base, p, tmp_path / "run", truncation=policy, max_steps=1), quiet=True)
    s = final["sft"]
    assert s["truncated" if policy == "truncate" else "skipped"] == 1
    assert s["conversations"] == len(CONVS) + 1 and s["examples"] == len(CONVS) + (policy == "truncate")


@pytest.mark.parametrize("kind", ["lmforge", "hf-llama3"])
def test_base_without_chat_tokens(corpus_files, data, tmp_path, kind):
    if kind == "lmforge":
        plain = tokenize.train("bpe", [str(corpus_files[0])], 300, special_tokens=["<|endoftext|>"],
                               show_progress=False)
        save(tiny(plain), tmp_path / "plain", tokenizer=plain)
        d = tmp_path / "plain"
    else:  # an HF chat model of another family: its own template and tokens, not lmforge's
        from hf_fixtures import make_tiny_hf_chat_model

        d = make_tiny_hf_chat_model(tmp_path, "llama3")
    with pytest.raises(ValueError, match=r"lacks the chat tokens.*<\|assistant\|>"):
        sft(cfg_for(d, data, tmp_path / "run"), quiet=True)
    assert not (tmp_path / "run").exists()


def test_neftune_noise_only_while_training(base, data, tok, tmp_path):
    cfg = cfg_for(base, data, tmp_path / "run", packing="bfd", batch_size=len(CONVS), max_steps=1,
                  neftune_alpha=50.0, val_frac=0.0)
    sft(cfg, quiet=True)
    want, _ = reference_loss(load(base)[0], tok, CONVS)
    assert abs(step_lines(tmp_path / "run")[0]["loss"] - want) > 1e-3  # the noise is on in training
    stage = SFTStage(cfg_for(base, data, tmp_path / "run2", neftune_alpha=50.0, val_frac=0.5))
    a = stage.evaluate("val", 0)["loss"]
    stage._neftune.remove()
    assert stage.evaluate("val", 0)["loss"] == a  # and off in evaluation


def test_hf_base_with_chat_tokens(base, data, tok, tmp_path):
    """An HF directory (here an lmforge export) is a base too; the first-step loss is the same as from the
    lmforge directory it was exported from."""
    from lmforge.model.hf import export_hf

    m, t = load(base)
    hf_dir = export_hf(m, tmp_path / "hf", tokenizer=t, tokens=load_tokens(base, t))
    c = dict(packing="bfd", batch_size=len(CONVS), max_steps=1)
    sft(cfg_for(base, data, tmp_path / "a", **c), quiet=True)
    sft(cfg_for(hf_dir, data, tmp_path / "b", **c), quiet=True)
    assert abs(step_lines(tmp_path / "a")[0]["loss"] - step_lines(tmp_path / "b")[0]["loss"]) < 1e-5


@pytest.mark.parametrize("kw,field", [(dict(packing="wrapped"), "packing"), (dict(truncation="cut"), "truncation"),
                                      (dict(loss_norm="seq"), "loss_norm"), (dict(lora_r=-1), "lora_r"),
                                      (dict(val_frac=1.5), "val_frac"), (dict(base=""), "base"),
                                      (dict(lora_r=4, optimizer="muon"), "optimizer"),
                                      (dict(sources=[]), "sources"), (dict(seq_len=4096), "seq_len")])
def test_bad_settings_name_the_field(base, data, tmp_path, kw, field):
    kw = dict(kw)
    cfg = cfg_for(kw.pop("base", base), data, tmp_path / "run", **kw)
    with pytest.raises(ValueError, match=field):
        check_config(cfg)
        SFTStage(cfg)


# ---- the command line ----------------------------------------------------------------------------

def test_cli_help_lists_the_options(capsys):
    from lmforge.cli import main

    with pytest.raises(SystemExit) as e:
        main(["sft", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--base", "--out", "--data", "--generators", "--lora-r", "--lora-alpha", "--lora-targets",
                "--packing", "--max-steps", "--max-time", "--resume", "--config", "--set"):
        assert opt in text, opt


def test_cli_runs_and_resumes_from_its_config(base, data, tmp_path, capsys):
    from lmforge.cli import main

    out = tmp_path / "run"
    args = ["sft", "--base", str(base), "--out", str(out), "--data", str(data), "--max-steps", "2", "-q",
            "--no-export", "--set", "val_frac=0", "--set", "threads=1", "--set", "device=cpu", "--set", "seq_len=128"]
    assert main(args) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["step"] == 2 and final["sft"]["conversations"] == len(CONVS)
    # the run's own train_config.json continues it (a longer bound)
    assert main(["sft", "--config", str(out / "train_config.json"), "--resume", "--max-steps", "3", "-q"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 3
    assert main(args[:-2] + ["--set", "packing=wrapped"]) == 2
    assert "packing" in capsys.readouterr().err


@pytest.mark.parametrize("shuffle", [True, False])
def test_order_is_what_the_first_step_sees(base, data, tok, tmp_path, shuffle):
    """``SFTStage.order(0)``: the conversations in the order the batches feed them (what TRL is given)."""
    cfg = cfg_for(base, data, tmp_path / "run", packing="none", batch_size=3, max_steps=1, shuffle=shuffle)
    first = [c["messages"] for c in SFTStage(cfg).order(0)[:3]]
    assert len(first) == 3
    sft(cfg, quiet=True)
    want, n = reference_loss(load(base)[0], tok, first)
    rec = step_lines(tmp_path / "run")[0]
    assert abs(rec["loss"] - want) < 1e-5 and rec["trained_tokens"] == n
    if not shuffle:  # the mixture's own order
        from lmforge.align.data import load_sources

        convs, _ = load_sources([{"path": str(data)}], seed=cfg.seed)
        assert first == [c["messages"] for c in convs[:3]]


def test_package_names(base, data, tmp_path):
    """``lmforge.align`` re-exports the stages' names; ``align.sft`` (module and function share the name) runs a
    fine-tune either way it is reached."""
    import lmforge.align as align
    from lmforge.align import sft as f

    assert align.SFTConfig is SFTConfig and align.SFTBatches.__module__ == "lmforge.align.packing"
    assert callable(f) and callable(align.sft)
    final = f(cfg_for(base, data, tmp_path / "run", max_steps=1), quiet=True)
    assert final["step"] == 1
    with pytest.raises(AttributeError):
        align.no_such_name


def test_packing_choices_are_the_batch_source_modes():
    from lmforge.align import packing
    from lmforge.align.sft import PACKING

    assert set(PACKING) == set(packing.MODES)


def test_generated_sources_are_checked_against_the_evaluation(base, tmp_path):
    """Generator sources: final.json counts coincidences with the evaluation's dev/private items (0), and a
    planted private item is counted (the check can fail)."""
    from lmforge.align.sft import sft
    from lmforge.evaluate import builtin

    sources = [{"generator": "addition", "n": 40}, {"generator": "brackets", "n": 40}]
    cfg = cfg_for(base, tmp_path / "unused.jsonl", tmp_path / "run", sources=sources, max_steps=1)
    final = sft(cfg, quiet=True)
    assert final["sft"]["eval_overlap"] == {"addition": 0, "brackets": 0}

    import lmforge.align.generators as gen

    real = gen.GENERATORS["addition"]
    doc = builtin.generate("addition", "private", 1, digits=3)[0]

    def planted(n, seed=0, data_dir=None, **kw):
        convs = real(n, seed=seed, data_dir=data_dir, **kw)
        convs[0] = {**convs[0], "doc": doc}
        return convs

    import pytest as _pytest

    with _pytest.MonkeyPatch.context() as mp:
        mp.setitem(gen.GENERATORS, "addition", planted)
        cfg = cfg_for(base, tmp_path / "unused.jsonl", tmp_path / "run2", sources=sources[:1], max_steps=1)
        assert sft(cfg, quiet=True)["sft"]["eval_overlap"]["addition"] >= 1
