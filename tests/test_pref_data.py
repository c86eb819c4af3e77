"""lmforge.align.pref_data: every preference format read and every bad line named; the ids equal TRL 1.16's own
preprocessing (``DPOTrainer._prepare_dataset`` / ``KTOTrainer._prepare_dataset`` run on the HF export) and its
collators; padded == packed == a brute-force forward per sequence; prompt tokens never scored; LD-DPO and WPO
against their definitions; exact resume; KTO's KL rows are TRL's rotation."""
from __future__ import annotations

import json
import os
import types

import numpy as np
import pytest
import torch

from lmforge.align.pref_data import (PrefBatches, PrefExample, completion_logps, encode_preferences,
                                     normalize_preference, read_preferences, split_validation_pairs,
                                     unpair_preferences)
from lmforge.tokenize.chat import CHAT_SPECIAL_TOKENS, render

U = lambda s: {"role": "user", "content": s}  # noqa: E731
A = lambda s: {"role": "assistant", "content": s}  # noqa: E731
WORDS = "to be or not that is the question whether tis nobler in the mind to suffer slings arrows".split()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, corpus_files):
    """(tokenizer, TokenSpec, lmforge model, HF export dir): a 400-token BPE with the chat tokens and a Qwen3-shaped
    2 x 32 model moved off its init."""
    from conftest import perturbed

    from lmforge import tokenize
    from lmforge.model import load_tokens, make_config, save
    from lmforge.model.hf import export_hf
    from lmforge.model.transformer import Transformer

    tok = tokenize.train("bpe", [str(corpus_files[0])], 400, special_tokens=["<|endoftext|>", *CHAT_SPECIAL_TOKENS],
                         show_progress=False)
    torch.manual_seed(0)
    cfg = make_config(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=256,
                      norm="rmsnorm", mlp="swiglu", pos="rope", qk_norm=True, qkv_bias=False, out_bias=False,
                      mlp_bias=False, tie_embeddings=False, dropout=0.0, arch="qwen3")
    model = perturbed(Transformer(cfg), 0.1)
    d = tmp_path_factory.mktemp("pref")
    save(model, d / "lm", tokenizer=tok)
    spec = load_tokens(d / "lm", tok)
    export_hf(model, d / "hf", tokenizer=tok, tokens=spec)
    return tok, spec, model, d / "hf"


def write(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines), encoding="utf-8")
    return path


def rand_text(rng, lo, hi):
    return " ".join(rng.choice(WORDS, int(rng.integers(lo, hi))))


def conv_pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = [U(rand_text(rng, 1, 8))]
        if i % 3 == 0:
            p = [{"role": "system", "content": "Be brief."}, *p, A(rand_text(rng, 1, 4)), U(rand_text(rng, 1, 4))]
        ch, rj = rand_text(rng, 1, 12), rand_text(rng, 1, 12)
        if ch == rj:
            rj += " not"
        out.append({"prompt": p, "chosen": [A(ch)], "rejected": [A(rj)]})
    return out


def plain_pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"prompt": rand_text(rng, 1, 8), "chosen": " " + rand_text(rng, 1, 10), "rejected": " slings " +
             rand_text(rng, 1, 10)} for _ in range(n)]


# ---- reading ----

def test_every_format_is_read_and_normalized(tmp_path):
    lines = [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green.", "source": "hand"},
        {"prompt": [U("Sky?")], "chosen": [A("Blue.")], "rejected": [A("Green.")], "meta": {"task": "t", "score": 1}},
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        {"chosen": [U("Sky?"), A("Blue.")], "rejected": [U("Sky?"), A("Green.")]},
        {"prompt": "Sky?", "chosen": [U("Sky?"), A("Blue.")], "rejected": [U("Sky?"), A("Green.")]},
        "",
        {"prompt": "Q", "completion": " A", "label": True},
        {"prompt": [{"role": "developer", "content": "Be kind."}, U("Q")], "completion": [A("A")], "label": False},
    ]
    rows, st = read_preferences(write(tmp_path / "p.jsonl", lines))
    assert st == {"read": 7, "kept": 7, "skipped": {}, "errors": []}
    assert [r["id"] for r in rows] == [f"p.jsonl:{i}" for i in (1, 2, 3, 4, 5, 7, 8)]
    assert [(r["kind"], r["conversational"]) for r in rows] == [
        ("paired", False), ("paired", True), ("paired", False), ("paired", True), ("paired", True),
        ("unpaired", False), ("unpaired", True)]
    assert rows[0]["meta"] == {"source": "hand"} and rows[1]["meta"] == {"task": "t", "score": 1}
    # implicit prompts: TRL's extract_prompt (the space before the split goes to the completions)
    assert (rows[2]["prompt"], rows[2]["chosen"], rows[2]["rejected"]) == ("The sky is", " blue.", " green.")
    assert (rows[3]["prompt"], rows[3]["chosen"], rows[3]["rejected"]) == ([U("Sky?")], [A("Blue.")], [A("Green.")])
    assert rows[4]["prompt"] == [U("Sky?")] and rows[4]["meta"] == {"prompt_text": "Sky?"}
    assert rows[5]["label"] is True and rows[5]["completion"] == " A"
    assert rows[6]["prompt"][0] == {"role": "system", "content": "Be kind."} and rows[6]["label"] is False


def test_implicit_text_prompt_is_trls_extract_prompt():
    from trl.data_utils import extract_prompt

    for ch, rj in [("The sky is blue.", "The sky is green."), ("abc", "abd"), ("Say it: yes", "Say it: no"),
                   ("The sky is blue.", "The sky is blue. Really.")]:
        r = normalize_preference({"chosen": ch, "rejected": rj}, "x")
        assert (r["prompt"], r["chosen"], r["rejected"]) == tuple(extract_prompt({"chosen": ch, "rejected": rj}).values())


BAD = [  # (line, reason, the message's field and problem)
    ('{"prompt": "a", "chosen": "b"', "bad_json", ":1: bad JSON"),
    ('[1, 2]', "not_an_object", ":1: expected a JSON object, got list"),
    ({"prompt": "a", "rejected": "c"}, "missing_field", ":1: chosen: missing"),
    ({"prompt": "a", "chosen": "b"}, "missing_field", ":1: rejected: missing"),
    ({"prompt": "a"}, "missing_field", ":1: chosen: missing; expected"),
    ({"prompt": "a", "chosen": 3, "rejected": "c"}, "bad_type", ":1: chosen: expected a string or a list of messages"),
    ({"prompt": "a", "chosen": [1], "rejected": "c"}, "bad_type", ":1: chosen: expected a string or a list"),
    ({"prompt": "a", "chosen": "b", "rejected": [A("c")]}, "mixed_format", ":1: chosen/rejected: mixed formats"),
    ({"prompt": [U("a")], "chosen": "b", "rejected": "c"}, "mixed_format", ":1: prompt/chosen: mixed formats"),
    ({"prompt": "a", "chosen": [A("b")], "rejected": [A("c")]}, "mixed_format",
     ":1: prompt/chosen: mixed formats (prompt is a string"),
    ({"prompt": "a", "chosen": "  ", "rejected": "c"}, "empty_completion", ":1: chosen: empty completion"),
    ({"prompt": [U("a")], "chosen": [A("b")], "rejected": [A("")]}, "empty_completion",
     ":1: rejected[0].content: empty completion"),
    ({"prompt": [U("a")], "chosen": [A("b"), U("c")], "rejected": [A("d")]}, "bad_completion",
     ":1: chosen: expected one assistant message, got 2"),
    ({"prompt": [U("a")], "chosen": [U("b")], "rejected": [A("d")]}, "bad_completion", ":1: chosen[0].role: 'user'"),
    ({"prompt": [U("a"), A("b")], "chosen": [A("c")], "rejected": [A("d")]}, "bad_prompt",
     ":1: prompt[1].role: the prompt ends with a 'assistant' message"),
    ({"prompt": [{"role": "tool", "content": "x"}, U("a")], "chosen": [A("c")], "rejected": [A("d")]},
     "unknown_role", ":1: prompt[0].role: unknown role 'tool'"),
    ({"prompt": [U("a"), {"role": "system", "content": "s"}, U("b")], "chosen": [A("c")], "rejected": [A("d")]},
     "system_not_first", ":1: prompt[1].role: a system message after the first message"),
    ({"prompt": [U(3)], "chosen": [A("c")], "rejected": [A("d")]}, "content_not_string",
     ":1: prompt[0].content: must be a string"),
    ({"prompt": [{"role": "user"}], "chosen": [A("c")], "rejected": [A("d")]}, "bad_message",
     ":1: prompt[0]: missing 'content'"),
    ({"chosen": [U("a"), A("b")], "rejected": [U("x"), A("b")]}, "bad_prompt", ":1: chosen/rejected: no common first"),
    ({"chosen": [U("a"), A("b")], "rejected": [U("a"), A("b")]}, "bad_completion",
     ":1: chosen/rejected: one conversation is the start of the other"),
    ({"chosen": "q  ", "rejected": "q  x"}, "empty_completion", ":1: chosen: empty completion once"),
    ({"prompt": "q", "completion": "a", "label": 1}, "bad_label", ":1: label: expected true or false, got int 1"),
    ({"prompt": "q", "completion": "a"}, "missing_field", ":1: label: missing"),
    ({"prompt": "q", "completion": "", "label": True}, "empty_completion", ":1: completion: empty completion"),
    ({"prompt": "q", "completion": [A("a")], "label": True}, "mixed_format", ":1: prompt/completion: mixed formats"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "label": True}, "bad_format", ":1: keys: both chosen/rejected"),
]


@pytest.mark.parametrize("line,reason,msg", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_line_names_file_line_and_field(tmp_path, line, reason, msg):
    p = write(tmp_path / "bad.jsonl", [line])
    with pytest.raises(ValueError) as e:
        read_preferences(p)
    assert str(e.value).startswith(str(p) + msg), str(e.value)
    assert e.value.reason == reason
    rows, st = read_preferences(p, on_error="skip")
    assert rows == [] and st["skipped"] == {reason: 1} and st["read"] == 1 and st["errors"] == [str(e.value)]


def test_skips_are_counted_per_reason_and_good_lines_kept(tmp_path):
    good = {"prompt": "a", "chosen": "b", "rejected": "c"}
    lines = [good, BAD[0][0], good, BAD[22][0], BAD[22][0], "", good, BAD[10][0]]
    p = tmp_path / "mix.jsonl"
    p.write_bytes(b"".join((l if isinstance(l, str) else json.dumps(l)).encode() + b"\n" for l in lines) + b"\xff\xfe\n")
    rows, st = read_preferences(p, on_error="skip")
    assert [r["id"] for r in rows] == ["mix.jsonl:1", "mix.jsonl:3", "mix.jsonl:7"]
    assert st["read"] == 8 and st["kept"] == 3
    assert st["skipped"] == {"bad_json": 1, "bad_label": 2, "empty_completion": 1, "bad_text": 1}
    with pytest.raises(ValueError, match="on_error"):
        read_preferences(p, on_error="ignore")
    with pytest.raises(FileNotFoundError, match="preference file not found"):
        read_preferences(tmp_path / "none.jsonl")


def test_unpair_gives_chosen_true_then_rejected_false():
    rows = [normalize_preference(r, f"r{i}") for i, r in enumerate(plain_pairs(3))]
    un = unpair_preferences(rows)
    assert [(u["completion"], u["label"]) for u in un] == [(x, lab) for r in rows
                                                           for x, lab in ((r["chosen"], True), (r["rejected"], False))]
    assert all(u["prompt"] == r["prompt"] for u, r in zip(un, [r for r in rows for _ in (0, 1)]))


def test_split_keeps_a_prompts_pairs_together_and_is_stable():
    rows = [normalize_preference(r, f"r{i}") for i, r in enumerate(conv_pairs(40) + plain_pairs(40))]
    rows += [dict(r, chosen=r["rejected"], rejected=r["chosen"]) for r in rows[::3]]  # more pairs of some prompts
    train, val = split_validation_pairs(rows, 0.25, seed=3)
    key = lambda r: json.dumps(r["prompt"])  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in val}
    assert len(train) + len(val) == len(rows) and 0.1 < len(val) / len(rows) < 0.4
    t2, v2 = split_validation_pairs(rows[::-1], 0.25, seed=3)  # order does not move a prompt
    assert {key(r) for r in v2} == {key(r) for r in val}
    assert {key(r) for r in split_validation_pairs(rows, 0.25, seed=4)[1]} != {key(r) for r in val}
    assert split_validation_pairs(rows[:2], 0.01, 0)[1]  # tiny fractions still give one
    raw = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in conv_pairs(40)]
    assert [len(x) for x in split_validation_pairs(raw, 0.25, 3)] == [len(x) for x in  # raw rows: the same split
                                                                     split_validation_pairs(conv_pairs(40), 0.25, 3)]
    with pytest.raises(ValueError, match="val_frac"):
        split_validation_pairs(rows, 1.0, 0)


# ---- tokens: as TRL 1.16 makes them ----

def trl_tokenized(hf_dir, rows, trainer="dpo", max_length=None, batch_size=2):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from datasets import Dataset
    from transformers import AutoTokenizer

    ht = AutoTokenizer.from_pretrained(hf_dir)
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=max_length, truncation_mode="keep_start",
                                 per_device_train_batch_size=batch_size)
    if trainer == "dpo":
        from trl.trainer.dpo_trainer import DPOTrainer as T

        self = types.SimpleNamespace(_tokenizer=ht)
    else:
        from trl.trainer.kto_trainer import KTOTrainer as T

        self = types.SimpleNamespace(_tokenizer=ht, calculate_KL=True, desirable_weight=1.0, undesirable_weight=1.0)
    return list(T._prepare_dataset(self, Dataset.from_list(rows), ht, args, "train")), ht


@pytest.mark.parametrize("kind", ["conversational", "plain", "implicit"])
def test_ids_equal_trls_own_preprocessing(exported, kind):
    tok, spec, _, hf = exported
    rows = {"conversational": conv_pairs(8), "plain": plain_pairs(8),
            "implicit": [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
                         for r in conv_pairs(8, seed=5)]}[kind]
    ref, _ = trl_tokenized(hf, rows)
    ex, st = encode_preferences(tok, rows, 10_000, tokens=spec)
    assert st["kept"] == 8 and st["prompt_not_prefix"] == 0
    for e, r in zip(ex, ref):
        assert (e.prompt, e.chosen, e.rejected) == (r["prompt_ids"], r["chosen_ids"], r["rejected_ids"])


def test_conversational_ids_are_the_renderers_and_hfs_template(exported):
    tok, spec, _, hf = exported
    from transformers import AutoTokenizer

    ht = AutoTokenizer.from_pretrained(hf)
    rows = conv_pairs(6, seed=2)
    ex, _ = encode_preferences(tok, rows, 10_000, tokens=spec)
    for e, r in zip(ex, rows):
        for comp, ids in ((r["chosen"], e.chosen), (r["rejected"], e.rejected)):
            full, mask = render(tok, r["prompt"] + comp)
            assert e.prompt == render(tok, r["prompt"], add_generation_prompt=True)[0]
            assert e.prompt + ids == full
            assert ids == [i for i, m in zip(full, mask) if m][-len(ids):]  # the completion is the trained turn
            assert list(ht.apply_chat_template(r["prompt"] + comp, tokenize=True, return_dict=True)["input_ids"]) == full
        assert ids[-1] == tok.special_tokens["<|end|>"]


def test_truncation_and_drops_as_trl(exported):
    tok, spec, _, hf = exported
    long = {"prompt": [U("to be")], "chosen": [A(" ".join(["question"] * 30))], "rejected": [A("no")]}
    same = {"prompt": "to be", "chosen": " or not", "rejected": " or not<|end|>"}  # equal once TRL's eos is added
    huge = {"prompt": " ".join(["nobler"] * 40), "chosen": " a", "rejected": " b"}
    tail_same = {"prompt": [U("x")], "chosen": [A("the mind to suffer a")], "rejected": [A("the mind to suffer b")]}
    short = [{"prompt": [U("be")], "chosen": [A("or")], "rejected": [A("not")]}]
    rows = [long, same, huge, tail_same, *short * 2]
    ex, st = encode_preferences(tok, rows, 16, tokens=spec)
    assert st == {"pairs": 6, "identical": 2, "empty_completion": 0, "prompt_too_long": 1, "truncated": 2,
                  "skipped_long": 0, "prompt_not_prefix": 0, "kept": 3, "tokens": st["tokens"]}
    assert all(len(e.prompt) + max(len(e.chosen), len(e.rejected)) <= 16 for e in ex)
    ref, _ = trl_tokenized(hf, [long], max_length=16)  # TRL drops no pair here; its collator cuts to 16
    r = ref[0]
    assert ex[0].prompt + ex[0].chosen == (r["prompt_ids"] + r["chosen_ids"])[:16]
    assert ex[0].prompt + ex[0].rejected == (r["prompt_ids"] + r["rejected_ids"])[:16]
    ex2, st2 = encode_preferences(tok, rows, 16, tokens=spec, truncation="skip")
    assert st2["skipped_long"] == 2 and st2["kept"] == 2 and st2["identical"] == 1
    ex3, st3 = encode_preferences(tok, rows, 10_000, tokens=spec, max_prompt_len=6)
    assert st3["prompt_too_long"] >= 2 and all(len(e.prompt) <= 6 for e in ex3)
    with pytest.raises(ValueError, match="truncation"):
        encode_preferences(tok, rows, 16, truncation="keep_end")
    with pytest.raises(ValueError, match="max_len"):
        encode_preferences(tok, rows, 1)


def test_a_template_whose_prompt_is_no_prefix_is_cut_where_they_diverge(exported):
    """A foreign template that ends the generation prompt with a token the full conversation lacks (as Gemma's
    empty thought block): TRL's rule, the prompt cut at the common prefix, and the case counted."""
    import dataclasses

    from lmforge.tokenize.chat import CHAT_TEMPLATE

    tok, spec, _, _ = exported
    odd = dataclasses.replace(spec, template="hf", chat_template=CHAT_TEMPLATE.replace(
        "{{- '<|assistant|>' -}}{%- endif -%}", "{{- '<|assistant|><|bos|>' -}}{%- endif -%}"))
    rows = conv_pairs(3, seed=4)
    ex, st = encode_preferences(tok, rows, 10_000, tokens=odd)
    good, _ = encode_preferences(tok, rows, 10_000, tokens=spec)
    assert st["prompt_not_prefix"] == 3 and st["kept"] == 3
    for e, g, r in zip(ex, good, rows):
        assert odd.encode_chat(tok, r["prompt"])[-1] == tok.special_tokens["<|bos|>"]
        assert (e.prompt, e.chosen, e.rejected) == (g.prompt, g.chosen, g.rejected)


def test_raw_rows_are_checked_and_precomputed_refs_read(exported):
    tok, spec, _, _ = exported
    ex, _ = encode_preferences(tok, [{"prompt": "a", "chosen": " b", "rejected": " c",
                                      "ref_chosen_logps": -1.5, "ref_rejected_logps": -2.0}], 64, tokens=spec)
    assert (ex[0].ref_chosen, ex[0].ref_rejected) == (-1.5, -2.0)
    with pytest.raises(ValueError, match=r"rows\[0\]: label: expected true or false"):
        encode_preferences(tok, [{"prompt": "a", "completion": "b", "label": "yes"}], 64)
    with pytest.raises(ValueError, match="meta.ref_chosen_logps: expected a finite number"):
        encode_preferences(tok, [{"prompt": "a", "chosen": " b", "rejected": " c", "ref_chosen_logps": "x"}], 64)


# ---- batches and log-probs ----

@pytest.fixture(scope="module")
def pairs(exported):
    tok, spec, _, _ = exported
    ex, _ = encode_preferences(tok, conv_pairs(10, seed=7) + plain_pairs(6, seed=8), 96, tokens=spec)
    return ex


def brute_logps(model, prompt, comp):
    """Sum of log p(completion token | everything before it), one sequence alone, full logits."""
    ids = torch.tensor([prompt + comp])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).float(), -1)[0]
    return sum(float(lp[len(prompt) + j - 1, t]) for j, t in enumerate(comp) if len(prompt) + j >= 1)


def test_padded_batch_is_trls_collator(pairs):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    b = PrefBatches(pairs, 4, shuffle=False, pad_id=7)
    batch = b.next()
    ref = DataCollatorForPreference(pad_token_id=7)([{"prompt_ids": e.prompt, "chosen_ids": e.chosen,
                                                      "rejected_ids": e.rejected} for e in pairs[:4]])
    for k in ("input_ids", "attention_mask", "completion_mask"):
        mine = batch.inputs["idx" if k == "input_ids" else k]
        assert torch.equal(mine, ref[k]), k
    assert batch.n == 4 and bool(batch.inputs["plain"])
    assert batch.trained == sum(len(e.chosen) + len(e.rejected) for e in pairs[:4])
    assert batch.tokens == int(ref["attention_mask"].sum())
    assert batch.inputs["index"].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_logps_equal_a_forward_per_sequence(exported, pairs, mode):
    _, _, model, _ = exported
    b = PrefBatches(pairs, 5, mode=mode, seed=1, seq_len=128)
    with torch.no_grad():
        for _ in range(len(b)):
            batch = b.next()
            out = completion_logps(model, batch)
            ex = [pairs[i] for i in batch.inputs["index"].tolist()]
            want = [brute_logps(model, e.prompt, e.chosen) for e in ex] + \
                   [brute_logps(model, e.prompt, e.rejected) for e in ex]
            torch.testing.assert_close(out["logps"], torch.tensor(want), atol=1e-5, rtol=1e-6)
            assert out["logps"].dtype == torch.float32
            assert out["tokens"].tolist() == [len(e.chosen) for e in ex] + [len(e.rejected) for e in ex]
    if mode == "packed":
        assert not bool(batch.inputs["plain"]) or batch.inputs["idx"].shape[0] == 2 * len(ex)
        assert batch.inputs["idx"].shape[0] < 2 * len(ex)  # sequences do share rows


def test_packed_equals_padded_with_gradients_and_any_callable(exported, pairs):
    _, _, model, _ = exported
    pad = PrefBatches(pairs, 8, mode="padded", seed=2).next()
    pk = PrefBatches(pairs, 8, mode="packed", seed=2, seq_len=200).next()
    assert not bool(pk.inputs["plain"])
    grads = []
    for batch, fwd in ((pad, model), (pk, model), (pk, lambda idx, **kw: model(idx, **kw))):
        model.zero_grad()
        lp = completion_logps(fwd, batch)["logps"]
        (lp * torch.linspace(0.5, 1.5, lp.numel())).sum().backward()
        grads.append((lp.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    for lp, g in grads[1:]:
        torch.testing.assert_close(lp, grads[0][0], atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(g, grads[0][1], atol=1e-5, rtol=1e-4)
    model.zero_grad()


def test_prompt_tokens_are_never_scored(exported, pairs):
    _, _, model, _ = exported
    batch = PrefBatches(pairs, 4, shuffle=False).next()
    inp = batch.inputs
    T = inp["idx"].shape[1]
    pos = inp["loss_pos"] + 1  # the scored token's own position
    assert bool((inp["completion_mask"].flatten()[pos] == 1).all())
    assert int(inp["completion_mask"].sum()) == pos.numel()  # every completion token once, nothing else
    # a change to a prompt token's logit target never moves the sum: rescore with the prompt's own ids replaced
    idx = inp["idx"].clone()
    with torch.no_grad():
        a = completion_logps(model, batch)["logps"]
        logits = model(idx)
        lp = torch.log_softmax(logits.float(), -1).reshape(-1, logits.shape[-1])
        flat_t = idx.flatten()
        per_tok = lp[torch.arange(lp.shape[0] - 1), flat_t[1:]]
        keep = inp["completion_mask"].flatten()[1:].bool() & (torch.arange(lp.shape[0] - 1) % T != T - 1)
        seq = torch.arange(lp.shape[0] - 1) // T
        want = torch.zeros(8).index_add(0, seq[keep], per_tok[keep])
    torch.testing.assert_close(a, want, atol=1e-5, rtol=1e-6)


def test_ld_alpha_and_wpo_weights_are_their_definitions(exported, pairs):
    _, _, model, _ = exported
    batch = PrefBatches(pairs, 4, seed=3).next()
    ex = [pairs[i] for i in batch.inputs["index"].tolist()]
    alpha = 0.3
    with torch.no_grad():
        out = completion_logps(model, batch, ld_alpha=alpha, weighting=True, token_stats=True)
        want, wts, ent, ml, top = [], [], [], [], []
        for which in ("chosen", "rejected"):
            for e in ex:
                comp = getattr(e, which)
                shared = min(len(e.chosen), len(e.rejected))
                ids = torch.tensor([e.prompt + comp])
                lp = torch.log_softmax(model(ids).float(), -1)[0]
                toks = [float(lp[len(e.prompt) + j - 1, t]) for j, t in enumerate(comp)]
                want.append(sum(x if j < shared else alpha * x for j, x in enumerate(toks)))
                logits = model(ids).float()[0]
                at = [len(e.prompt) + j - 1 for j in range(len(comp))]
                ent.append(float(sum(-(lp[t].exp() * lp[t]).sum() for t in at)))
                ml.append(float(sum(logits[t].mean() for t in at)))
                top.append(sum(int(logits[t].argmax()) == y for t, y in zip(at, comp)))
                sq = torch.logsumexp(2 * lp, -1)
                wts.append(float(np.exp(np.mean([toks[j] - float(sq[len(e.prompt) + j - 1])
                                                 for j in range(len(comp))]))))
    torch.testing.assert_close(out["logps"], torch.tensor(want), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(out["weight"], torch.tensor(wts), atol=1e-6, rtol=1e-5)
    assert not out["weight"].requires_grad
    torch.testing.assert_close(out["entropy"], torch.tensor(ent), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out["mean_logits"], torch.tensor(ml), atol=1e-4, rtol=1e-5)
    assert out["top1"].tolist() == top and 0 < sum(top) < sum(out["tokens"].tolist())


def test_resume_mid_epoch_gives_the_same_batches(pairs):
    a = PrefBatches(pairs, 3, seed=11, mode="packed")
    for _ in range(len(a) + 2):  # into the second epoch
        a.next()
    state = json.loads(json.dumps(a.state_dict()))
    want = [a.next() for _ in range(len(a) + 1)]
    b = PrefBatches(pairs, 3, seed=11, mode="packed")
    b.load_state_dict(state)
    got = [b.next() for _ in range(len(b) + 1)]
    for x, y in zip(want, got):
        assert x.inputs.keys() == y.inputs.keys() and all(torch.equal(x.inputs[k], y.inputs[k]) for k in x.inputs)
    assert a.order(0) != a.order(1) and sorted(a.order(1)) == list(range(len(pairs)))
    assert PrefBatches(pairs, 3, shuffle=False).order(4) == list(range(len(pairs)))
    with pytest.raises(ValueError, match="seed is 11 in the checkpoint but 12 now"):
        PrefBatches(pairs, 3, seed=12, mode="packed").load_state_dict(state)
    with pytest.raises(ValueError, match="fingerprint"):
        PrefBatches(pairs[1:] + pairs[:1], 3, seed=11, mode="packed").load_state_dict(state)


def test_kl_rows_are_trls_rotation(exported):
    tok, spec, model, hf = exported
    rows = unpair_preferences([normalize_preference(r, f"r{i}") for i, r in enumerate(conv_pairs(5, seed=9))])
    ex, _ = encode_preferences(tok, rows, 10_000, tokens=spec)
    raw = [{"prompt": r["prompt"], "completion": r["completion"], "label": r["label"]} for r in rows]
    ref, _ = trl_tokenized(hf, raw, trainer="kto", batch_size=4)
    b = PrefBatches(ex, 4, shuffle=False, kl=True)
    start = 0
    for _ in range(len(b)):
        batch = b.next()
        items = batch.inputs["index"].tolist()
        k = len(items)
        assert items == list(range(start, start + k))
        seqs = b.sequences(items)
        for j, i in enumerate(items):
            r = ref[i]
            assert (ex[i].prompt, ex[i].chosen) == (r["prompt_ids"], r["completion_ids"])
            assert seqs[j] == (r["prompt_ids"], r["completion_ids"])
            assert seqs[k + j] == (r["prompt_ids"], r["KL_completion_ids"])  # prompt i, completion i-1 mod k
            assert seqs[k + j][1] == ex[items[(j - 1) % k]].chosen
        assert batch.inputs["label"].tolist() == [ex[i].label for i in items]
        assert batch.trained == sum(len(ex[i].chosen) for i in items) and batch.n == k
        with torch.no_grad():
            lp = completion_logps(model, batch)["logps"]
        assert lp.shape == (2 * k,)
        assert abs(float(lp[k]) - brute_logps(model, *seqs[k])) < 1e-5 + 1e-6 * abs(float(lp[k]))
        start += k
    with pytest.raises(ValueError, match="ld_alpha"):
        completion_logps(model, batch, ld_alpha=0.5)


def test_bad_batch_inputs_are_refused(pairs):
    un = PrefExample("u", [1, 2], [3], None, label=True)
    with pytest.raises(ValueError, match="no preference examples"):
        PrefBatches([], 2)
    with pytest.raises(ValueError, match="example u: unpaired among paired"):
        PrefBatches([pairs[0], un], 2)
    with pytest.raises(ValueError, match="kl=True is for unpaired"):
        PrefBatches(pairs, 2, kl=True)
    with pytest.raises(ValueError, match="packing mode"):
        PrefBatches(pairs, 2, mode="bfd")
    with pytest.raises(ValueError, match="seq_len: expected an int >="):
        PrefBatches(pairs, 2, seq_len=4)
    with pytest.raises(ValueError, match="batch_size"):
        PrefBatches(pairs, 0)


def test_names_through_the_package():
    import lmforge.align as align
    from lmforge.align import pref_data

    for name in ("read_preferences", "split_validation_pairs", "PrefExample", "encode_preferences", "PrefBatches",
                 "completion_logps", "unpair_preferences"):
        assert getattr(align, name) is getattr(pref_data, name) and name in align.__all__


def test_a_completion_at_position_zero_is_scored_from_its_second_token(exported):
    """No BOS and an empty prompt (a plain row): nothing predicts the first token, so TRL (its shifted mask) and
    lmforge score the completion from its second token; a completion left with none is dropped."""
    import dataclasses

    tok, spec, model, _ = exported
    bare = dataclasses.replace(spec, add_bos=False, stop=[])
    ex, st = encode_preferences(tok, [{"prompt": "", "chosen": "to be or not", "rejected": "that is the question"},
                                      {"prompt": "", "chosen": "a", "rejected": "that"}], 64, tokens=bare)
    assert st["kept"] == 1 and st["empty_completion"] == 1 and ex[0].prompt == []
    batch = PrefBatches(ex, 1).next()
    with torch.no_grad():
        out = completion_logps(model, batch)
    assert out["tokens"].tolist() == [len(ex[0].chosen) - 1, len(ex[0].rejected) - 1]
    want = [brute_logps(model, [], ex[0].chosen), brute_logps(model, [], ex[0].rejected)]
    torch.testing.assert_close(out["logps"], torch.tensor(want), atol=1e-5, rtol=1e-6)
