"""DPO parity with TRL end to end: ``trl.DPOTrainer`` on the HF export of a tiny lmforge model against lmforge.

Reference: TRL 1.16's ``DPOTrainer`` on conversational pairs (prompt = messages ending with a user turn,
chosen / rejected = one assistant message each). TRL tokenizes ``apply_chat_template(prompt,
add_generation_prompt=True)`` and ``apply_chat_template(prompt + chosen)`` and takes the completion where the two
diverge: with lmforge's template that is ``chat.render``'s prompt and the assistant turn to its ``<|end|>``. The
settings ``run_trl`` needs (each one says why): ``bf16=False`` (DPOConfig defaults bf16 autocast, on CPU too),
``learning_rate`` set (default 1e-6), ``lr_scheduler_type="constant"`` with ``warmup_steps=0`` (= lmforge's
``constant`` schedule, ``warmup_steps=0``), ``weight_decay=0`` (TRL's default, and HF's and lmforge's no-decay
groups differ), the same Adam betas / eps and clip, gradient checkpointing off, ``max_length=None`` (no truncation),
``logging_steps=1`` (a logged value is the mean since the last log), ``disable_dropout=True`` (the default: but it
only zeroes ``nn.Dropout`` modules, not a Qwen3 config's ``attention_dropout``, so the export carries dropout 0;
the lmforge model directory carries dropout 0.1 and lmforge must switch it off itself), the reference model either
loaded from the same directory (``ref_model=None``, ``precompute_ref_log_probs=False``) or precomputed
(``precompute_ref_log_probs=True``): both are the policy's initial weights. TRL's loss is the mean over the
micro-batch's pairs divided by ``gradient_accumulation_steps`` (``loss_is_scaled_for_ga=False``): with equal
micro-batches, lmforge's sum over pairs / the step's pairs. TRL 1.16 ignores ``padding_free`` for DPO (it warns
and pads) and has no ``use_logits_to_keep`` (its fused LM head scores only the completion positions).

The data: ``B * GA`` pairs, one optimizer step per epoch, ``STEPS`` epochs: every step sees every pair, so the
loss, the mean rewards and the gradient do not depend on the order either side draws them in (the order-sensitive
part, the per-pair token ids, is asserted separately). Step 1's rewards are 0 on both sides (policy = reference);
steps 2 and 3 move them. Compared per step: loss, ``rewards/chosen``, ``rewards/rejected`` and the pre-clip
gradient norm, within 1e-5 (relative above 1: ipo's gradient norms are 5-30). Measured: sigmoid <= 1.1e-6, ipo
<= 1e-5 absolute (7e-7 relative on its norms): the two sides differ in kernels (attention, TRL's chunked fused
log-probabilities, summation order), and Adam amplifies such differences in small gradient entries from step 2.

Three lmforge sides: a hand-written loop (``chat.render`` ids, padded rows, summed completion log-probs, the loss
written out, lmforge's AdamW) that checks the TRL settings; lmforge's ``align.pref_data`` ids; and
``lmforge.align.dpo.dpo`` itself (its metrics.jsonl, and the gradient norm the loop clips, read unrounded).
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
from conftest import in_ci, perturbed

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # (TRL's call)

B, GA, STEPS = 4, 1, 3
LR, BETAS, EPS, CLIP = 3e-3, (0.9, 0.95), 1e-8, 1.0  # (eps: lmforge's AdamW default; LoopConfig has no eps knob)
BETA = {"sigmoid": 0.1, "ipo": 0.5}  # ipo: target margin 1 / (2 beta) = 1 (at 0.1 it is 5: gradient norms ~100)
TOL = 1e-5
SEQ, SEED = 128, 0


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread (tiny matrices; on a shared 2-core machine more threads only contend)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _need(module: str):
    """Import a reference; outside CI a missing one skips, in CI it fails (the `ref` extra installs it)."""
    if in_ci():
        return __import__(module)
    return pytest.importorskip(module)


def _lmforge(module: str):
    """An lmforge module of issue 19 (``align.dpo``, ``align.pref_data``): imported, never skipped in CI."""
    import importlib

    if in_ci():
        return importlib.import_module(module)
    return pytest.importorskip(module)


def pairs() -> list[dict]:
    """Conversational pairs of varied lengths: a system message on one, a two-turn prompt on another, completions
    of different lengths (chosen longer on some, shorter on others)."""
    out = []
    for i, (a, b) in enumerate([(12, 30), (7, 85), (41, 3), (66, 19), (5, 5), (23, 58), (90, 9), (14, 14)][:B * GA]):
        prompt = [{"role": "user", "content": f"What is {a} plus {b}?"}]
        if i % 4 == 1:
            prompt = [{"role": "system", "content": "Be brief."}, *prompt]
        if i % 4 == 2:
            prompt = [{"role": "user", "content": "Count with me."}, {"role": "assistant", "content": "Sure."},
                      *prompt]
        good, bad = f"{a} plus {b} is {a + b}.", f"{a + b + 1}"
        if i % 2:
            good, bad = f"{a + b}", f"I think {a} plus {b} is {a + b - 2}, my lord."
        out.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": good}],
                    "rejected": [{"role": "assistant", "content": bad}]})
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, corpus_files):
    """(lmforge model dir, HF export dir, tokenizer, JSONL of the pairs): a Qwen3-shaped 2 x 64 model (qk-norm,
    SwiGLU, untied) moved off its init, a 400-token BPE with lmforge's chat tokens. The lmforge directory's config
    has dropout 0.1 (lmforge's preference stage must turn it off), the export's 0 (see the module notes)."""
    from lmforge import tokenize
    from lmforge.model import load_tokens, make_config, save
    from lmforge.model.hf import export_hf
    from lmforge.model.transformer import Transformer
    from lmforge.tokenize.chat import CHAT_SPECIAL_TOKENS

    tok = tokenize.train("bpe", [str(corpus_files[0])], 400, special_tokens=["<|endoftext|>", *CHAT_SPECIAL_TOKENS],
                         show_progress=False)
    kw = dict(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=64, d_ff=128, max_seq_len=SEQ, norm="rmsnorm",
              mlp="swiglu", pos="rope", qk_norm=True, qkv_bias=False, out_bias=False, mlp_bias=False,
              tie_embeddings=False, arch="qwen3")
    torch.manual_seed(0)
    model = perturbed(Transformer(make_config(**kw, dropout=0.0)), 0.1)
    d = tmp_path_factory.mktemp("dpo_trl")
    save(model, d / "hf_src", tokenizer=tok)
    export_hf(model, d / "hf", tokenizer=tok, tokens=load_tokens(d / "hf_src", tok))
    with_dropout = Transformer(make_config(**kw, dropout=0.1))
    with_dropout.load_state_dict(model.state_dict())
    save(with_dropout, d / "lm", tokenizer=tok)
    f = d / "pairs.jsonl"
    f.write_text("".join(json.dumps(p) + "\n" for p in pairs()))
    return d / "lm", d / "hf", tok, f


def no_checkpointing(config_cls) -> dict:
    """TRL defaults activation (gradient) checkpointing on: off (same numbers, faster). transformers 5 renamed
    the field and warns on the old name."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_cls)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": False}


def run_trl(hf_dir, rows: list[dict], out_dir, loss_type: str, *, precompute: bool = False, ga: int = GA) -> dict:
    """TRL's DPOTrainer on ``rows``: per-step logged metrics and grad norm, and its tokenized pairs."""
    _need("trl")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the trainer pings telemetry at init otherwise
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    settings = dict(
        output_dir=str(out_dir), per_device_train_batch_size=len(rows) // ga, gradient_accumulation_steps=ga,
        max_steps=STEPS, learning_rate=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS,
        max_grad_norm=CLIP, weight_decay=0.0,  # (TRL's defaults: 1e-6, 0.9, 0.999, 1e-8, 1.0, 0.0)
        lr_scheduler_type="constant", warmup_steps=0,
        beta=BETA[loss_type], loss_type=[loss_type], precompute_ref_log_probs=precompute,
        bf16=False, fp16=False,  # DPOConfig defaults bf16=True: bf16 autocast, on CPU too
        max_length=None,  # (the default 1024 would not cut these; None says no truncation)
        disable_dropout=True,  # (the default; only nn.Dropout modules, see the module notes)
        train_sampling_strategy="sequential",  # deterministic (the comparison does not depend on the order)
        logging_steps=1,  # the logged metrics are means since the last log (default every 10 steps)
        save_strategy="no", report_to="none", use_cpu=True, dataloader_num_workers=0, seed=SEED, disable_tqdm=True)
    settings.update(no_checkpointing(DPOConfig))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(hf_dir)
    trainer = DPOTrainer(model=model, args=DPOConfig(**settings), processing_class=tok,
                         train_dataset=Dataset.from_list(rows))
    # the export has no pad token: TRL pads with the eos, <|end|>; its completion mask is built before padding
    assert trainer.processing_class.pad_token == trainer.processing_class.eos_token == "<|end|>"
    assert (trainer.ref_model is None) == precompute
    ds = trainer.train_dataset
    ids = [(ds[i]["prompt_ids"], ds[i]["chosen_ids"], ds[i]["rejected_ids"]) for i in range(len(ds))]
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    assert len(logs) == STEPS
    keys = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected")
    return {"ids": ids, **{k: [h[k] for h in logs] for k in keys}}


@pytest.fixture(scope="module", params=["sigmoid", "ipo"])
def trl_run(request, exported, tmp_path_factory):
    _, hf_dir, _, _ = exported
    return request.param, run_trl(hf_dir, pairs(), tmp_path_factory.mktemp("trl_out"), request.param)


def render_pair(tok, p: dict) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen ids, rejected ids) from ``chat.render``: the prompt with the generation prompt, each
    completion the rest of the rendered conversation (its assistant text and <|end|>)."""
    from lmforge.tokenize.chat import render

    prompt = render(tok, p["prompt"], add_generation_prompt=True)[0]
    out = [prompt]
    for side in ("chosen", "rejected"):
        full = render(tok, p["prompt"] + p[side])[0]
        assert full[:len(prompt)] == prompt
        out.append(full[len(prompt):])
    return tuple(out)


def seq_logps(model, tok, rows: list[tuple]) -> torch.Tensor:
    """Summed completion log-probs (2B,) of [chosen..., rejected...], right-padded rows, one forward."""
    seqs = [(p + c, len(p)) for p, c, _ in rows] + [(p + r, len(p)) for p, _, r in rows]
    T = max(len(s) for s, _ in seqs)
    idx = torch.zeros(len(seqs), T, dtype=torch.long)
    att = torch.zeros(len(seqs), T, dtype=torch.long)
    comp = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, (s, p) in enumerate(seqs):
        idx[i, :len(s)] = torch.tensor(s)
        att[i, :len(s)] = 1
        comp[i, p:len(s)] = True
    logits = model(idx, attention_mask=att).float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, idx[:, 1:, None])[..., 0]
    return (lp * comp[:, 1:]).sum(1), comp[:, 1:].sum(1).float()


def reference_loop(lm_dir, tok, loss_type: str) -> dict:
    """The DPO trainer TRL should equal, written out: every step all pairs; loss = mean over pairs of sigmoid
    -log sigma(beta (dc - dr)) or ipo ((dc / |c| - dr / |r|) - 1 / (2 beta))^2 with d = policy - reference
    summed completion log-probs; clip; lmforge's AdamW at a constant rate. Dropout off (eval mode)."""
    from lmforge.model import load
    from lmforge.train.optim import build_optimizers

    model, _ = load(lm_dir)
    ref, _ = load(lm_dir)
    model.eval()  # dropout off; gradients still flow
    rows = [render_pair(tok, p) for p in pairs()]
    with torch.no_grad():
        ref_lp, _ = seq_logps(ref.eval(), tok, rows)
    (opt,) = build_optimizers(model, "adamw", lr=LR, weight_decay=0.0, betas=BETAS, eps=EPS)
    out = {k: [] for k in ("loss", "grad_norm", "rewards/chosen", "rewards/rejected")}
    for _ in range(STEPS):
        lp, n = seq_logps(model, tok, rows)
        dc, dr = (lp - ref_lp).chunk(2)
        nc, nr = n.chunk(2)
        beta = BETA[loss_type]
        if loss_type == "sigmoid":
            per = -torch.nn.functional.logsigmoid(beta * (dc - dr))
        else:
            per = (dc / nc - dr / nr - 1 / (2 * beta)) ** 2
        loss = per.mean()
        loss.backward()
        out["grad_norm"].append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        out["loss"].append(loss.item())
        out["rewards/chosen"].append((beta * dc).mean().item())
        out["rewards/rejected"].append((beta * dr).mean().item())
    return {"ids": rows, **out}


def assert_close(ours: list[float], theirs: list[float], what: str, tol: float = TOL) -> None:
    """Each step within ``tol``, relative for values above 1 (an ipo gradient norm of 30 is a sum of ~10^5 squares
    whose fp32 summation order alone moves it by ~1e-6 relative)."""
    diffs = [abs(a - b) / max(1.0, abs(b)) for a, b in zip(ours, theirs)]
    print(f"{what}: largest difference {max(diffs):.2e} over {len(diffs)} steps")  # (pytest -s shows it)
    assert len(ours) == len(theirs) and max(diffs) <= tol, (
        f"{what}: lmforge {ours} vs TRL {theirs} (largest difference {max(diffs):.2e}, tolerance {tol})")


COMPARED = ("loss", "rewards/chosen", "rewards/rejected", "grad_norm")


def test_trl_run_trains(trl_run):
    """The comparison is not of constant numbers: step 1 sits at policy = reference (rewards 0, sigmoid loss
    log 2), later steps move the rewards apart and the loss down."""
    loss_type, t = trl_run
    assert t["rewards/chosen"][0] == t["rewards/rejected"][0] == 0.0
    if loss_type == "sigmoid":
        assert abs(t["loss"][0] - math.log(2)) < 1e-6
    assert all(g > 1e-3 and math.isfinite(g) for g in t["grad_norm"])
    assert abs(t["rewards/margins"][-1]) > 1e-3 and t["loss"][-1] < t["loss"][0]
    assert min(abs(t["rewards/chosen"][-1]), abs(t["rewards/rejected"][-1])) > 1e-4


def test_lmforge_directory_has_live_dropout(exported):
    """The lmforge side's model directory says dropout 0.1 and, in train mode, two forwards differ: a stage that
    left it on could not match TRL (whose export has none)."""
    from lmforge.model import load

    lm_dir, _, tok, _ = exported
    model, _ = load(lm_dir)
    assert model.cfg.dropout == 0.1
    rows = [render_pair(tok, p) for p in pairs()]
    model.train()
    with torch.no_grad():
        a, _ = seq_logps(model, tok, rows)
        b, _ = seq_logps(model, tok, rows)
    assert (a - b).abs().max() > 1e-3


def test_trl_equals_the_reference_loop(exported, trl_run):
    """TRL's tokenization is ``chat.render``'s, and its per-step loss, rewards and gradient norm are the written-out
    DPO loop's (1e-5)."""
    lm_dir, _, tok, _ = exported
    loss_type, t = trl_run
    ref = reference_loop(lm_dir, tok, loss_type)
    assert [tuple(map(list, r)) for r in ref["ids"]] == [tuple(map(list, r)) for r in t["ids"]]
    for k in COMPARED:
        assert_close(ref[k], t[k], f"{loss_type} {k} (reference loop)")


def test_trl_precomputed_reference_is_the_same(exported, trl_run, tmp_path):
    """``precompute_ref_log_probs=True`` (no reference model in memory) gives TRL's own numbers to 1e-6: the
    setting lmforge's default ``reference="precomputed"`` is compared against, and the benchmark's TRL side."""
    _, hf_dir, _, _ = exported
    loss_type, t = trl_run
    pre = run_trl(hf_dir, pairs(), tmp_path / "trl_pre", loss_type, precompute=True)
    for k in COMPARED:
        assert_close(pre[k], t[k], f"{loss_type} {k} (TRL precomputed vs loaded reference)", tol=1e-6)


def test_pref_data_ids_equal_trl(exported, trl_run):
    """``align.pref_data``'s per-pair prompt / chosen / rejected ids are TRL's, pair for pair."""
    pref_data = _lmforge("lmforge.align.pref_data")
    _, _, tok, f = exported
    _, t = trl_run
    rows, stats = pref_data.read_preferences(f)
    assert stats["kept"] == len(rows) == B * GA
    examples, st = pref_data.encode_preferences(tok, rows, SEQ)
    assert st["kept"] == B * GA and st["truncated"] == 0
    assert [(e.prompt, e.chosen, e.rejected) for e in examples] == [tuple(map(list, r)) for r in t["ids"]]


def run_lmforge_dpo(lm_dir, data, out, loss_type: str, monkeypatch, **overrides) -> dict:
    """``lmforge.align.dpo.dpo`` with the matching settings: its metrics.jsonl per step, and the pre-clip gradient
    norm the loop computes (metrics.jsonl rounds it to 4 decimals; read here from ``clip_grad_norm_`` itself)."""
    dpo_mod = _lmforge("lmforge.align.dpo")
    norms = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording(*a, **kw):
        n = clip(*a, **kw)
        norms.append(float(n))
        return n

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    settings = dict(out=str(out), base=str(lm_dir), data=[str(data)], val_frac=0.0, batch_size=B, grad_accum=GA,
                    seq_len=SEQ, max_steps=STEPS, optimizer="adamw", lr=LR, weight_decay=0.0, beta1=BETAS[0],
                    beta2=BETAS[1], grad_clip=CLIP, schedule="constant", warmup_steps=0, eval_every=0,
                    sample_every=0, log_every=1, checkpoint_every=0, seed=SEED, ema=0.0, dtype="fp32",
                    device="cpu", export_hf=False, method="dpo", loss_type=[loss_type], beta=BETA[loss_type], lora_r=0)
    settings.update(overrides)
    dpo_mod.dpo(dpo_mod.DPOConfig(**settings), quiet=True)
    monkeypatch.undo()
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    recs = [r for r in recs if "loss" in r and "step" in r]
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    assert len(norms) == STEPS
    return {"grad_norm": norms, **{k: [r[k] for r in recs] for k in ("loss", "rewards/chosen", "rewards/rejected")}}


@pytest.mark.parametrize("reference,packing", [("precomputed", "padded"), ("copy", "padded"),
                                               ("precomputed", "packed")])
def test_trl_equals_lmforge_dpo(exported, trl_run, tmp_path, monkeypatch, reference, packing):
    """``lmforge.align.dpo.dpo`` itself on the lmforge model directory (dropout 0.1 in its config: the stage must
    turn it off), each reference mode and packing: TRL's per-step loss, rewards/chosen, rewards/rejected and
    gradient norm within 1e-5."""
    lm_dir, _, _, f = exported
    loss_type, t = trl_run
    ours = run_lmforge_dpo(lm_dir, f, tmp_path / "dpo", loss_type, monkeypatch, reference=reference,
                           packing=packing)
    for k in COMPARED:
        assert_close(ours[k], t[k], f"{loss_type} {k} (lmforge dpo, reference={reference}, packing={packing})")


def test_trl_equals_lmforge_dpo_with_accumulation(exported, tmp_path, monkeypatch):
    """Gradient accumulation: 2 micro-batches of 2 pairs a step. TRL divides each micro-batch's mean by
    ``gradient_accumulation_steps`` and logs the mean of the micro-batches' metrics; lmforge's loop divides the
    summed per-pair losses by the step's pairs. Equal micro-batches: the same loss, rewards and gradient norm."""
    lm_dir, hf_dir, _, f = exported
    t = run_trl(hf_dir, pairs(), tmp_path / "trl", "sigmoid", ga=2)
    ours = run_lmforge_dpo(lm_dir, f, tmp_path / "dpo", "sigmoid", monkeypatch, batch_size=B // 2, grad_accum=2)
    for k in COMPARED:
        assert_close(ours[k], t[k], f"sigmoid {k} (lmforge dpo, 2 x 2 pairs accumulated)")
