"""lmforge.align.packing: encoding and masks, best-fit-decreasing packing, the three row layouts, the SFT
loss (packed == unpacked, per conversation, with gradients) and NEFTune."""
import itertools
import math

import numpy as np
import pytest
import torch

from lmforge.align.packing import (IGNORE, MODES, Example, SFTBatches, add_neftune, encode, pack_bfd,
                                   per_conversation_loss, sft_loss)
from lmforge.tokenize.chat import CHAT_SPECIAL_TOKENS, END, render

WORDS = "to be or not that is the question whether tis nobler in the mind to suffer slings arrows".split()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared CPU: no oversubscription (and the same reductions every run)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok(corpus_files):
    from lmforge.tokenize import ByteBPE

    return ByteBPE.train(corpus_files[:1], 400, special_tokens=CHAT_SPECIAL_TOKENS, show_progress=False)


def make_convs(n, seed=0, long=False):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        msgs = []
        if rng.random() < 0.3:
            msgs.append({"role": "system", "content": "Be brief."})
        for _ in range(int(rng.integers(1, 3))):
            msgs.append({"role": "user", "content": " ".join(rng.choice(WORDS, int(rng.integers(1, 10))))})
            k = int(rng.integers(1, 60 if long else 14))
            msgs.append({"role": "assistant", "content": " ".join(rng.choice(WORDS, k))})
        out.append({"messages": msgs, "id": f"t:{i}"})
    return out


@pytest.fixture(scope="module")
def examples(tok):
    ex, st = encode(tok, make_convs(24, seed=1), 96)
    assert st["skipped"] == 0 and len(ex) == 24
    return ex


def tiny_model(vocab, pos, seed=0):
    # (max_seq_len 1024: the model refuses a learned-position row longer than max_seq_len even when its
    # position_ids restart, and a padding_free row is a whole micro-batch long)
    from lmforge.model import make_config
    from lmforge.model.transformer import Transformer

    torch.manual_seed(seed)
    kw = dict(norm="rmsnorm", mlp="swiglu", arch="llama") if pos == "rope" else dict(norm="layernorm", mlp="gelu")
    m = Transformer(make_config(vocab_size=vocab, n_layer=2, n_head=2, d_model=32, max_seq_len=1024, pos=pos, **kw))
    with torch.no_grad():  # off its init, so every weight (and every position) matters
        g = torch.Generator().manual_seed(seed + 1)
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return m


# ---- encode ----

def test_encode_targets_are_the_shifted_assistant_tokens(tok):
    convs = make_convs(6, seed=2)
    ex, st = encode(tok, convs, 10_000)
    assert st == {"conversations": 6, "truncated": 0, "skipped": 0, "skipped_long": 0, "skipped_untrained": 0,
                  "tokens": sum(len(e) for e in ex), "trained_tokens": sum(e.trained for e in ex)}
    end = tok.special_tokens[END]
    for c, e in zip(convs, ex):
        ids, mask = render(tok, c["messages"])
        assert e.id == c["id"] and e.ids.tolist() == ids and e.mask.tolist() == mask
        assert e.ids.dtype == np.int64 and e.mask.dtype == np.int8
        t = e.targets()
        assert t[-1] == IGNORE  # the last position never predicts (the next example's first token)
        for p in range(len(ids) - 1):
            assert t[p] == (ids[p + 1] if mask[p + 1] else IGNORE)
        # what is trained is the assistants' text and each closing <|end|>, nothing else
        trained = [ids[p + 1] for p in range(len(ids) - 1) if t[p] != IGNORE]
        want = "".join(m["content"] + END for m in c["messages"] if m["role"] == "assistant")
        assert tok.decode(trained) == want and trained.count(end) == sum(m["role"] == "assistant"
                                                                          for m in c["messages"])


def test_encode_truncation_policies_are_counted(tok):
    convs = make_convs(30, seed=3, long=True)
    lens = [len(render(tok, c["messages"])[0]) for c in convs]
    cap = int(np.median(lens))
    ex, st = encode(tok, convs, cap, truncation="truncate")
    over = sum(n > cap for n in lens)
    assert 0 < over < 30 and st["truncated"] == over
    assert st["skipped"] == st["skipped_untrained"] and len(ex) == 30 - st["skipped"]
    assert all(len(e) <= cap and e.trained > 0 for e in ex)
    full = {c["id"]: render(tok, c["messages"])[0] for c in convs}
    assert all(e.ids.tolist() == full[e.id][:cap] for e in ex)  # the first max_len tokens
    ex2, st2 = encode(tok, convs, cap, truncation="skip")
    assert st2["skipped"] == st2["skipped_long"] == over and st2["truncated"] == 0 and len(ex2) == 30 - over
    assert st2["tokens"] == sum(n for n in lens if n <= cap)


def test_encode_skips_a_conversation_truncated_before_any_answer(tok):
    c = {"messages": [{"role": "user", "content": " ".join(WORDS * 3)}, {"role": "assistant", "content": "Ay."}],
         "id": "f.jsonl:7"}
    ex, st = encode(tok, [c], 8)
    assert ex == [] and st["skipped"] == st["skipped_untrained"] == 1 and st["trained_tokens"] == 0


def test_encode_bad_input_names_the_conversation(tok):
    with pytest.raises(ValueError, match="conversation f.jsonl:3: message 0: unknown role 'wizard'"):
        encode(tok, [{"messages": [{"role": "wizard", "content": "x"}], "id": "f.jsonl:3"}], 64)
    with pytest.raises(ValueError, match="content must be a string"):
        encode(tok, [{"messages": [{"role": "user", "content": 3}]}], 64)
    with pytest.raises(ValueError, match="no 'messages'"):
        encode(tok, [{"prompt": "x"}], 64)
    with pytest.raises(ValueError, match="truncation"):
        encode(tok, [], 64, truncation="cut")
    with pytest.raises(ValueError, match="max_len"):
        encode(tok, [], 1)


# ---- pack_bfd ----

def naive_bfd(lengths, cap):
    """The definition, spelled out: longest first, into the bin with the least room that still fits."""
    bins, loads = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b in range(len(bins)) if loads[b] + lengths[i] <= cap]
        if fits:
            b = min(fits, key=lambda b: (cap - loads[b], b))
            bins[b].append(i)
            loads[b] += lengths[i]
        else:
            bins.append([i])
            loads.append(lengths[i])
    return bins


def optimum(lengths, cap):
    """The fewest bins, by trying every assignment (small inputs only)."""
    n = len(lengths)
    for k in range(1, n + 1):
        def place(i, loads):
            if i == n:
                return True
            seen = set()
            for b in range(k):
                if loads[b] + lengths[i] <= cap and loads[b] not in seen:
                    seen.add(loads[b])
                    loads[b] += lengths[i]
                    if place(i + 1, loads):
                        return True
                    loads[b] -= lengths[i]
            return False
        if place(0, [0] * k):
            return k
    return 0


def check_bins(bins, lengths, cap):
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))  # every item exactly once
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert all(0 < x <= cap for x in loads)  # no bin overflows
    # any-fit: a bin was opened only when its first item fitted nowhere, so no two bins would fit in one
    assert all(a + b > cap for a, b in itertools.combinations(loads, 2))
    assert len(bins) <= max(1, 2 * math.ceil(sum(lengths) / cap))


def test_pack_bfd_equals_the_definition_and_keeps_its_invariants():
    rng = np.random.default_rng(0)
    for trial in range(200):
        cap = int(rng.integers(4, 64))
        lengths = rng.integers(1, cap + 1, size=int(rng.integers(0, 60))).tolist()
        if trial % 3 == 0:
            lengths = [min(cap, x) for x in rng.choice([1, 2, cap // 2, cap // 3 + 1, cap], size=len(lengths))]
        bins = pack_bfd(lengths, cap)
        assert bins == naive_bfd(lengths, cap)
        check_bins(bins, lengths, cap)
    assert pack_bfd([], 8) == []
    assert pack_bfd([3, 5, 3, 5], 8) == [[1, 0], [3, 2]]  # ties: lower index first, into the first bin


def test_pack_bfd_against_the_brute_force_optimum():
    rng = np.random.default_rng(1)
    worse = 0
    for _ in range(150):
        cap = int(rng.integers(5, 20))
        lengths = rng.integers(1, cap + 1, size=int(rng.integers(1, 9))).tolist()
        opt, got = optimum(lengths, cap), len(pack_bfd(lengths, cap))
        assert opt <= got <= 11 / 9 * opt + 6 / 9  # the FFD/BFD worst-case bound (Dosa 2007)
        worse += got > opt
    assert worse < 15  # optimal on nearly every small input
    # a classic case where decreasing order matters: first-fit in the given order needs 3 bins
    assert len(pack_bfd([2, 2, 3, 3], 5)) == 2


def test_pack_bfd_is_fast_and_fills_rows():
    rng = np.random.default_rng(2)
    lengths = rng.integers(20, 400, size=20_000).tolist()
    import time

    t0 = time.perf_counter()
    bins = pack_bfd(lengths, 1024)
    dt = time.perf_counter() - t0
    assert sum(sum(lengths[i] for i in b) for b in bins) / (1024 * len(bins)) > 0.98  # rows >98% full
    assert dt < 5


def test_pack_bfd_bad_input():
    with pytest.raises(ValueError, match="item 1: length 9 does not fit a bin of 8"):
        pack_bfd([3, 9], 8)
    with pytest.raises(ValueError, match="item 0: length 0"):
        pack_bfd([0], 8)
    with pytest.raises(ValueError, match="capacity"):
        pack_bfd([1], 0)


# ---- SFTBatches ----

def unpack(batch):
    """The conversations a batch holds, read back from its tensors: {doc id: (ids, targets, positions)}."""
    inp = {k: v.numpy() for k, v in batch.inputs.items()}
    out = {}
    for r in range(inp["idx"].shape[0]):
        for d in np.unique(inp["doc_ids"][r]):
            sel = inp["doc_ids"][r] == d
            if d < 0:
                assert (inp["attention_mask"][r][sel] == 0).all() and (inp["targets"][r][sel] == IGNORE).all()
                continue
            assert d not in out  # distinct ids across the batch
            where = np.flatnonzero(sel)
            assert (np.diff(where) == 1).all()  # contiguous
            assert (inp["attention_mask"][r][sel] == 1).all()
            out[int(d)] = (inp["idx"][r][sel], inp["targets"][r][sel], inp["position_ids"][r][sel])
    return out


@pytest.mark.parametrize("mode", MODES)
def test_batches_hold_every_example_once_per_epoch_intact(examples, mode):
    sb = SFTBatches(examples, 4, 96, mode=mode, pad_id=7, seed=3)
    by_ids = {}
    for e in examples:
        by_ids.setdefault(tuple(e.ids.tolist()), []).append(e)
    for epoch in range(2):
        seen = []
        for _ in range(len(sb)):
            b = sb.next()
            inp = b.inputs
            R, T = inp["idx"].shape
            if mode == "bfd":
                assert T == 96
            if mode == "padding_free":
                assert R == 1 and (inp["attention_mask"] == 1).all()  # no padding at all
            if mode in ("none", "grouped"):
                assert R <= 4 and bool(inp["plain"])
            docs = unpack(b)
            assert sorted(docs) == list(range(len(docs)))
            for d, (ids, tgt, pos) in docs.items():
                e = by_ids[tuple(ids.tolist())][0]
                assert (tgt == e.targets()).all() and (pos == np.arange(len(ids))).all()
                seen.append(e.id)
            assert b.tokens == sum(len(v[0]) for v in docs.values()) == int(inp["attention_mask"].sum())
            assert b.trained == int((inp["targets"] != IGNORE).sum()) == len(inp["loss_pos"])
            assert b.n == b.trained
            flat_t = inp["targets"].reshape(-1)
            assert (flat_t[inp["loss_pos"]] == inp["loss_targets"]).all()
            assert (inp["idx"][inp["attention_mask"] == 0] == 7).all()
        assert sorted(seen) == sorted(e.id for e in examples)
        assert sb.epoch == epoch + 1 and sb.cursor == 0


def test_batches_reshuffle_per_epoch_deterministically(examples):
    a = SFTBatches(examples, 4, 96, mode="none", seed=5)
    b = SFTBatches(examples, 4, 96, mode="none", seed=5)
    c = SFTBatches(examples, 4, 96, mode="none", seed=6)
    assert a.order(0) == b.order(0) != c.order(0)
    assert a.order(0) != a.order(1) and sorted(a.order(1)) == list(range(len(examples)))
    assert SFTBatches(examples, 4, 96, mode="none", shuffle=False).order(3) == list(range(len(examples)))
    p0, p1 = a.plan(0), a.plan(1)
    assert p0 != p1
    bf = SFTBatches(examples, 3, 96, mode="bfd", seed=5)
    assert bf.plan(0) != bf.plan(1) and len(bf.plan(0)) == len(bf.plan(1)) == len(bf)


@pytest.mark.parametrize("mode", MODES)
def test_resume_mid_epoch_gives_identical_batches(examples, mode):
    a = SFTBatches(examples, 3, 96, mode=mode, seed=11)
    for _ in range(len(a) + 2):  # into the second epoch
        a.next()
    state = a.state_dict()
    b = SFTBatches(examples, 3, 96, mode=mode, seed=11)
    b.load_state_dict(state)
    for _ in range(len(a) + 1):
        x, y = a.next(), b.next()
        assert (x.n, x.tokens, x.trained) == (y.n, y.tokens, y.trained)
        assert x.inputs.keys() == y.inputs.keys()
        assert all(torch.equal(x.inputs[k], y.inputs[k]) for k in x.inputs)


def test_batches_bad_input(examples):
    with pytest.raises(ValueError, match=r"example t:\d+: \d+ tokens is longer than seq_len=16"):
        SFTBatches(examples, 2, 16)
    with pytest.raises(ValueError, match="packing mode"):
        SFTBatches(examples, 2, 96, mode="greedy")
    with pytest.raises(ValueError, match="loss norm"):
        SFTBatches(examples, 2, 96, norm="sequence")
    with pytest.raises(ValueError, match="no examples"):
        SFTBatches([], 2, 96)
    with pytest.raises(ValueError, match="no trained token"):
        SFTBatches([Example(np.arange(4), np.zeros(4, np.int8), "x")], 2, 96)
    sb = SFTBatches(examples, 2, 96, seed=1)
    with pytest.raises(ValueError, match="seed is 2 in the checkpoint but 1 now"):
        sb.load_state_dict({**sb.state_dict(), "seed": 2})
    with pytest.raises(ValueError, match="cursor"):
        sb.load_state_dict({**sb.state_dict(), "cursor": 10_000})
    other = list(examples)
    other[0] = Example(other[0].ids[:-1].copy(), other[0].mask[:-1].copy(), other[0].id)  # same count, other data
    with pytest.raises(ValueError, match="fingerprint is"):
        SFTBatches(other, 2, 96, seed=1).load_state_dict(sb.state_dict())
    SFTBatches(list(examples), 2, 96, seed=1).load_state_dict(sb.state_dict())  # the same data: fine


def test_grouped_batches_are_nearly_unpadded(tok):
    ex, _ = encode(tok, make_convs(400, seed=4, long=True), 256)
    pad = {}
    for mode in ("none", "grouped"):
        sb = SFTBatches(ex, 8, 256, mode=mode, seed=2)
        cells = real = 0
        for _ in range(len(sb)):
            b = sb.next()
            cells, real = cells + b.inputs["idx"].numel(), real + b.tokens
            assert bool(b.inputs["plain"])
        pad[mode] = 1 - real / cells
    assert pad["grouped"] < 0.02 < 0.2 < pad["none"]
    g = SFTBatches(ex, 8, 256, mode="grouped", seed=2)
    p0, p1 = g.plan(0), g.plan(1)
    assert p0 != p1 and sorted(g.order(1)) == list(range(len(ex)))
    for rows in p0:  # each micro-batch: longest first
        lens = [len(ex[r[0]]) for r in rows]
        assert lens == sorted(lens, reverse=True)
    from lmforge.align.packing import GROUP_SPAN

    span = GROUP_SPAN * 2  # unshuffled: the examples' order, each span sorted longest first (ties: index)
    want = [i for s in range(0, len(ex), span) for i in sorted(range(s, min(s + span, len(ex))),
                                                                key=lambda i: (-len(ex[i]), i))]
    assert len(ex) > 2 * span and SFTBatches(ex, 2, 256, mode="grouped", shuffle=False).order(0) == want


def test_conversation_norm_counts_conversations(examples):
    sb = SFTBatches(examples, 4, 96, mode="bfd", norm="conversation", seed=0)
    b = sb.next()
    assert b.n == len(unpack(b)) and b.trained > b.n


# ---- the loss: packed == unpacked ----

def reference_losses(model, examples):
    """Each example alone, through the model's own forward and loss: its mean CE over trained tokens."""
    out = []
    for e in examples:
        idx = torch.from_numpy(e.ids)[None]
        _, loss = model(idx, torch.from_numpy(e.targets())[None])
        out.append(loss)
    return torch.stack(out)


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_packed_and_unpacked_give_the_same_losses_and_gradients(tok, examples, pos):
    model = tiny_model(tok.vocab_size, pos)
    sel = list(range(12))
    ref = reference_losses(model, [examples[i] for i in sel]).detach()
    sub = [examples[i] for i in sel]
    results = {}
    for mode in MODES:
        for norm in ("token", "conversation"):
            sb = SFTBatches(sub, {"bfd": 4, "grouped": 3}.get(mode, 12), 96, mode=mode, norm=norm, shuffle=False)
            model.zero_grad()
            per, total, n, bins = torch.zeros(len(sub)), 0.0, 0, 0
            for _ in range(len(sb)):
                rows = sb.plan(0)[sb.cursor]
                b = sb.next()
                members = [i for r in rows for i in r]  # doc d of the batch is example members[d]
                per[members] = per_conversation_loss(model, b).detach()
                loss = sft_loss(model, b, norm=norm)
                loss.backward()
                total, n, bins = total + loss.item(), n + b.n, bins + b.inputs["idx"].shape[0]
            if mode == "bfd":
                assert bins < len(sub)  # really packed: rows held several conversations
            grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()]) / n
            results[mode, norm] = (per, total / n, grads)
            torch.testing.assert_close(per, ref, atol=1e-5, rtol=1e-5)
    trained = torch.tensor([float(e.trained) for e in sub])
    for norm, want in (("token", (ref * trained).sum() / trained.sum()), ("conversation", ref.mean())):
        for mode in MODES:
            _, total, g = results[mode, norm]
            assert abs(total - want.item()) < 1e-5
            torch.testing.assert_close(g, results["none", norm][2], atol=1e-5, rtol=1e-4)
    # the gradients are those of the reference's loss, too
    model.zero_grad()
    ref_loss = (reference_losses(model, sub) * trained).sum() / trained.sum()
    ref_loss.backward()
    g_ref = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(results["bfd", "token"][2], g_ref, atol=1e-5, rtol=1e-4)
    assert g_ref.abs().max() > 1e-3  # gradients that could differ


def test_sft_loss_through_any_logits_callable_equals_the_fast_path(tok, examples):
    model = tiny_model(tok.vocab_size, "rope")
    sb = SFTBatches(examples, 4, 96, mode="bfd", seed=0)
    b = sb.next()
    calls = []

    def fwd(idx, **kw):  # a wrapper that hides hidden_states: the full-logits path
        calls.append(sorted(kw))
        return model(idx, **kw)

    for norm in ("token", "conversation"):
        torch.testing.assert_close(sft_loss(fwd, b, norm), sft_loss(model, b, norm), atol=1e-5, rtol=1e-6)
    assert calls[0] == ["attention_mask", "doc_ids", "position_ids"]
    with pytest.raises(ValueError, match="loss norm"):
        sft_loss(model, b, "mean")


# ---- NEFTune ----

def test_neftune_magnitude_and_eval_untouched(tok):
    model = tiny_model(tok.vocab_size, "rope")
    idx = torch.randint(0, tok.vocab_size, (3, 50))
    clean = model.tok_emb(idx).detach()
    h = add_neftune(model, 5.0)
    model.eval()
    assert torch.equal(model.tok_emb(idx), clean)
    e0 = model(idx)
    model.train()
    noisy = model.tok_emb(idx).detach()
    d = (noisy - clean).abs()
    mag = 5.0 / math.sqrt(50 * 32)
    assert d.max() <= mag * (1 + 1e-6) and d.max() > 0.95 * mag  # uniform in [-mag, mag]
    assert abs(d.mean().item() - mag / 2) < 0.05 * mag
    model.eval()
    torch.testing.assert_close(model(idx), e0, atol=0, rtol=0)
    model.train()
    h.remove()
    assert torch.equal(model.tok_emb(idx), clean)
    with pytest.raises(ValueError, match="alpha"):
        add_neftune(model, -1)


def test_neftune_equals_transformers(tok):
    from transformers.integrations.neftune import neftune_post_forward_hook

    model = tiny_model(tok.vocab_size, "learned")
    model.train()
    idx = torch.randint(0, tok.vocab_size, (2, 40))
    emb = model.tok_emb
    h = add_neftune(model, 3.0)
    torch.manual_seed(9)
    ours = emb(idx).detach()
    h.remove()
    emb.neftune_noise_alpha = 3.0
    h2 = emb.register_forward_hook(neftune_post_forward_hook)
    torch.manual_seed(9)
    theirs = emb(idx).detach()
    h2.remove()
    torch.testing.assert_close(ours, theirs, atol=1e-7, rtol=0)
    assert not torch.equal(ours, emb(idx))


def test_moe_router_losses_join_the_sft_loss(tok, examples):
    """A MoE model's SFT loss keeps its load-balancing and z-losses: one conversation alone gives the model's
    own training loss (mean CE + weighted router losses) times n."""
    from lmforge.model import preset
    from lmforge.model.hf import HF_CLASSES
    from lmforge.model.transformer import Transformer

    over = {} if "mixtral" in HF_CLASSES else {"hf_family": "none"}
    torch.manual_seed(0)
    m = Transformer(preset("tiny-mixtral", vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32,
                           max_seq_len=128, **{"moe.d_expert": 32, "moe.z_loss_coef": 1e-2}, **over))
    m.train()
    b = SFTBatches(examples[:1], 1, 96, mode="none", shuffle=False).next()
    e = examples[0]
    _, want = m(torch.from_numpy(e.ids)[None], torch.from_numpy(e.targets())[None])
    got = sft_loss(m, b) / b.n
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert m.router_metrics["aux_loss"] > 0 and (got - m.router_metrics["ce"]).abs() > 1e-4
