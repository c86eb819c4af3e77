"""SFT parity with TRL: ``trl.SFTTrainer`` on the HF export of a tiny lmforge model against lmforge.

Reference: TRL 1.16's ``SFTTrainer`` with ``assistant_only_loss=True`` (the export's chat template marks the
assistant's text and its closing ``<|end|>`` with ``{% generation %}``, so transformers' assistant mask is
``chat.render``'s loss mask), packing off, fp32, no shuffling (``train_sampling_strategy="sequential"``),
AdamW with the same betas/eps/weight decay, the same clip and the linear schedule without warmup
(= lmforge's ``wsd`` with ``decay_frac=1``, ``min_lr_ratio=0``); ``run_trl`` says why each setting is
needed. TRL normalizes a step's loss by the trained tokens of all its
gradient-accumulation micro-batches (``num_items_in_batch``): lmforge's ``loss_norm="token"``.

Compared per optimizer step: the loss (1e-5; measured <= 1e-6, the floor being metrics.jsonl's 6 decimals)
and the trained-token count (exactly). Four steps here; 40 steps of the reference loop (10 epochs, loss 6.4 ->
0.5) were measured within 3e-7 of TRL. The two sides differ only in kernels (attention, TRL's chunked
log-probabilities, summation order); Adam, dividing by sqrt(v), amplifies such differences in small gradient
entries, so long runs or high rates may drift apart slowly: the first steps are the check. Four lmforge sides: a hand-written loop (render masks, summed CE / step tokens, lmforge's
AdamW), lmforge's SFT batches and loss (``lmforge.align.packing``), ``lmforge.align.sft.sft`` itself, and
``sft`` with LoRA against TRL training a PEFT adapter that starts from the same weights.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
from conftest import in_ci, perturbed

B, GA, STEPS = 2, 2, 4               # 16 conversations: one epoch exactly
LR, WD, BETAS, EPS, CLIP = 3e-3, 0.1, (0.9, 0.95), 1e-8, 1.0
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


def conversations() -> list[list[dict]]:
    """16 varied conversations: one and two assistant turns, a system message on some, 33-91 tokens."""
    import random

    rng = random.Random(0)
    out = []
    for i in range(16):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        msgs = [{"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
        if i % 3 == 0:
            msgs = [{"role": "system", "content": "Be brief."}, *msgs,
                    {"role": "user", "content": "And doubled?"}, {"role": "assistant", "content": str(2 * (a + b))}]
        if i % 5 == 1:
            msgs[-1]["content"] += " Now is the winter of our discontent made glorious summer."
        out.append(msgs)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, corpus_files):
    """(lmforge model dir, HF export dir, tokenizer): a Qwen3-shaped 2 x 64 model (qk-norm, SwiGLU, untied),
    moved off its init; a 400-token BPE with lmforge's chat tokens."""
    from lmforge import tokenize
    from lmforge.model import load_tokens, make_config, save
    from lmforge.model.hf import export_hf
    from lmforge.model.transformer import Transformer
    from lmforge.tokenize.chat import CHAT_SPECIAL_TOKENS

    tok = tokenize.train("bpe", [str(corpus_files[0])], 400, special_tokens=["<|endoftext|>", *CHAT_SPECIAL_TOKENS],
                         show_progress=False)
    torch.manual_seed(0)
    cfg = make_config(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=64, d_ff=128, max_seq_len=128,
                      norm="rmsnorm", mlp="swiglu", pos="rope", qk_norm=True, qkv_bias=False, out_bias=False,
                      mlp_bias=False, tie_embeddings=False, dropout=0.0, arch="qwen3")
    model = perturbed(Transformer(cfg), 0.1)
    d = tmp_path_factory.mktemp("trl")
    save(model, d / "lm", tokenizer=tok)
    export_hf(model, d / "hf", tokenizer=tok, tokens=load_tokens(d / "lm", tok))
    return d / "lm", d / "hf", tok


def no_checkpointing(config_cls) -> dict:
    """TRL defaults activation (gradient) checkpointing on: off (same numbers, faster). transformers 5 renamed
    the field and warns on the old name."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_cls)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": False}


def run_trl(hf_dir, convs, out_dir, adapter=None, **overrides) -> dict:
    """TRL's SFTTrainer on ``convs`` in this order: per-step loss, trained tokens, lr and grad norm.
    ``adapter``: a PEFT adapter directory to train (PEFT's ``PeftModel``, only the adapter trainable)."""
    _need("trl")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # SFTTrainer pings telemetry at init otherwise
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    counts: list[int] = []

    class Recording(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            counts.append(int(num_items_in_batch))  # the step's trained tokens, given to each micro-batch
            return super().training_step(model, inputs, num_items_in_batch)

    settings = dict(
        output_dir=str(out_dir), per_device_train_batch_size=B, gradient_accumulation_steps=GA, max_steps=STEPS,
        learning_rate=LR, weight_decay=WD, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS,
        max_grad_norm=CLIP,  # (TRL's defaults: 2e-5, 0.0, 0.9, 0.999, 1e-8, 1.0; lmforge's differ: set them all)
        lr_scheduler_type="linear", warmup_steps=0,  # HF warmup is k/W (step 1 at lr 0), lmforge's (k+1)/W
        assistant_only_loss=True,  # labels from the template's {% generation %} mask
        packing=False,  # bfd packing regroups the whole dataset into rows: other batches than lmforge's
        bf16=False, fp16=False,  # TRL defaults bf16=True: bf16 autocast, on CPU too
        train_sampling_strategy="sequential", shuffle_dataset=False,  # the order given (default: RandomSampler)
        max_length=None,  # the default 1024 truncates and drops fully masked rows
        logging_steps=1,  # the logged loss is the mean since the last log (default every 10 steps)
        save_strategy="no", report_to="none", use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True)
    settings.update(no_checkpointing(SFTConfig))
    settings.update(overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa")
    if adapter is not None:
        peft = _need("peft")
        model = peft.PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    trainer = Recording(model=model, args=SFTConfig(**settings), processing_class=tok,
                        train_dataset=Dataset.from_list([{"messages": c} for c in convs]))
    # the export has no pad token (no stop token may pad, and this tokenizer has no <|pad|>): TRL pads with the
    # eos, <|end|>; its labels are built before padding, so every real <|end|> stays trained (counts equal)
    assert trainer.processing_class.pad_token == trainer.processing_class.eos_token == "<|end|>"
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    assert len(logs) == STEPS and len(counts) == STEPS * GA
    assert all(counts[i] == counts[i - i % GA] for i in range(len(counts)))  # one count per step
    return {"loss": [h["loss"] for h in logs], "trained": counts[::GA], "lr": [h["learning_rate"] for h in logs],
            "grad_norm": [h["grad_norm"] for h in logs]}


@pytest.fixture(scope="module")
def data(exported, tmp_path_factory):
    """(JSONL file of the conversations, the conversations in the order lmforge's SFT feeds them in epoch 0):
    ``align.data.load_sources`` (its seeded mixture order), ``align.packing.encode`` and ``SFTBatches``'
    seeded epoch order, as ``sft`` builds them. TRL gets this order (sequential sampler, no shuffle)."""
    from lmforge.align.data import load_sources
    from lmforge.align.packing import SFTBatches, encode

    _, _, tok = exported
    f = tmp_path_factory.mktemp("data") / "convs.jsonl"
    f.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations()))
    convs, _ = load_sources([{"path": str(f)}], seed=SEED)
    examples, stats = encode(tok, convs, SEQ)
    assert stats["truncated"] == stats["skipped"] == 0 and len(examples) == len(convs) == 16
    order = SFTBatches(examples, B, SEQ, mode="none", seed=SEED).order(0)
    assert sorted(order) == list(range(16)) and order != list(range(16))  # a real (seeded) shuffle
    return f, [convs[i]["messages"] for i in order]


@pytest.fixture(scope="module")
def trl_run(exported, data, tmp_path_factory):
    _, hf_dir, _ = exported
    return run_trl(hf_dir, data[1], tmp_path_factory.mktemp("trl_out"))


def reference_loop(lm_dir, tok, steps: list[list[list[dict]]], betas=BETAS) -> dict:
    """The plain trainer TRL should equal, written out: each step's micro-batches of conversations rendered with
    ``chat.render``; loss = sum of CE over trained tokens / the step's trained tokens; clip; lmforge's AdamW at
    lr LR * (1 - step / STEPS)."""
    from lmforge.model import load
    from lmforge.tokenize.chat import render
    from lmforge.train.optim import build_optimizers

    model, _ = load(lm_dir)
    model.train()
    (opt,) = build_optimizers(model, "adamw", lr=LR, weight_decay=WD, betas=betas, eps=EPS)
    losses, trained, norms = [], [], []
    for s, micro in enumerate(steps):
        rendered = [[render(tok, c) for c in mb] for mb in micro]
        n = sum(sum(mask[1:]) for mb in rendered for _, mask in mb)
        total = 0.0
        for mb in rendered:
            T = max(len(ids) for ids, _ in mb) - 1
            idx = torch.zeros(len(mb), T, dtype=torch.long)
            tgt = torch.full((len(mb), T), -100)
            att = torch.zeros(len(mb), T, dtype=torch.long)
            for r, (ids, mask) in enumerate(mb):
                k = len(ids) - 1
                idx[r, :k] = torch.tensor(ids[:-1])
                att[r, :k] = 1
                tgt[r, :k] = torch.tensor([t if m else -100 for t, m in zip(ids[1:], mask[1:])])
            logits = model(idx, attention_mask=att)
            ce = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), tgt.reshape(-1),
                                                   ignore_index=-100, reduction="sum")
            (ce / n).backward()
            total += ce.item()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        for g in opt.param_groups:
            g["lr"] = LR * (1 - s / len(steps))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total / n)
        trained.append(n)
    return {"loss": losses, "trained": trained, "grad_norm": norms}


def in_steps(convs: list) -> list[list[list]]:
    """Sequential order: step s holds micro-batches [convs of rows (s GA + j) B ...]."""
    mbs = [convs[i:i + B] for i in range(0, len(convs), B)]
    return [mbs[i:i + GA] for i in range(0, len(mbs), GA)]


def assert_close(ours: list[float], theirs: list[float], what: str, tol: float = TOL) -> None:
    diffs = [abs(a - b) for a, b in zip(ours, theirs)]
    print(f"{what}: largest difference {max(diffs):.2e} over {len(diffs)} steps")  # (pytest -s shows it)
    assert len(ours) == len(theirs) and max(diffs) <= tol, (
        f"{what}: lmforge {ours} vs TRL {theirs} (largest difference {max(diffs):.2e}, tolerance {tol})")


def test_trl_settings_give_the_documented_schedule(trl_run):
    """The per-step learning rate TRL used is lmforge's wsd schedule with decay_frac=1, min_lr_ratio=0, no warmup
    (the mapping the notes give), and the run trains (the comparison is not of four constant numbers)."""
    from lmforge.train.schedule import lr_multiplier

    ours = [LR * lr_multiplier(s / STEPS, s, "wsd", 0, 0.0, 1.0) for s in range(STEPS)]
    assert_close(ours, trl_run["lr"], "learning rate", tol=1e-12)
    assert all(l > 0 and math.isfinite(l) for l in trl_run["loss"])
    assert trl_run["loss"][-1] < trl_run["loss"][0] - 0.5


def test_trl_equals_the_reference_loop(exported, data, trl_run):
    """Same conversations, order, batch, accumulation, AdamW, clip and schedule: per-step loss within 1e-5,
    trained-token counts equal, pre-clip gradient norms within 1e-4. The same loop at TRL's default beta2
    (0.999) moves off by more than 100x the tolerance: the comparison can fail."""
    lm_dir, _, tok = exported
    ref = reference_loop(lm_dir, tok, in_steps(data[1]))
    assert ref["trained"] == trl_run["trained"]
    assert_close(ref["loss"], trl_run["loss"], "per-step loss")
    assert_close(ref["grad_norm"], trl_run["grad_norm"], "gradient norm", tol=1e-4)
    wrong = reference_loop(lm_dir, tok, in_steps(data[1]), betas=(0.9, 0.999))
    assert abs(wrong["loss"][1] - trl_run["loss"][1]) < TOL  # Adam's first update does not depend on beta2
    assert max(abs(a - b) for a, b in zip(wrong["loss"][2:], trl_run["loss"][2:])) > 100 * TOL


@pytest.mark.parametrize("mode", ["none", "padding_free"])
def test_trl_equals_lmforge_sft_batches_and_loss(exported, data, trl_run, mode):
    """lmforge's SFT rows (``SFTBatches``, padded or padding-free) and loss (``sft_loss``, summed and divided by
    the step's accumulated n, as the loop does) on the lmforge model: TRL's per-step loss and trained tokens."""
    from lmforge.align.data import load_sources
    from lmforge.align.packing import SFTBatches, encode, sft_loss
    from lmforge.model import load
    from lmforge.train.optim import build_optimizers

    lm_dir, _, tok = exported
    model, _ = load(lm_dir)
    model.train()
    convs, _ = load_sources([{"path": str(data[0])}], seed=SEED)
    batches = SFTBatches(encode(tok, convs, SEQ)[0], B, SEQ, mode=mode, seed=SEED, norm="token")
    (opt,) = build_optimizers(model, "adamw", lr=LR, weight_decay=WD, betas=BETAS, eps=EPS)
    losses, trained = [], []
    for s in range(STEPS):
        micro = [batches.next() for _ in range(GA)]
        n = sum(b.n for b in micro)
        total = 0.0
        for b in micro:
            loss = sft_loss(model, b, "token")
            (loss / n).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        for g in opt.param_groups:
            g["lr"] = LR * (1 - s / STEPS)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total / n)
        trained.append(sum(b.trained for b in micro))
    assert trained == trl_run["trained"]
    assert_close(losses, trl_run["loss"], f"per-step loss ({mode} rows)")


def _sft_or_skip():
    from lmforge.align.sft import SFTConfig, sft

    return SFTConfig, sft


@pytest.mark.parametrize("packing", ["none", "padding_free"])
def test_trl_equals_lmforge_sft(exported, data, trl_run, tmp_path, packing):
    """``lmforge.align.sft.sft`` itself (the shared loop, its metrics.jsonl) with the matching settings: a full
    fine-tune, no validation share, token normalization, wsd with decay_frac=1 (= TRL's linear), no warmup."""
    SFTConfig, sft = _sft_or_skip()
    lm_dir, _, _ = exported
    cfg = SFTConfig(out=str(tmp_path / "sft"), base=str(lm_dir), sources=[{"path": str(data[0])}], val_frac=0.0,
                    packing=packing, loss_norm="token", lora_r=0, neftune_alpha=0.0, batch_size=B, grad_accum=GA,
                    seq_len=SEQ, max_steps=STEPS, optimizer="adamw", lr=LR, weight_decay=WD, beta1=BETAS[0],
                    beta2=BETAS[1], grad_clip=CLIP, schedule="wsd", decay_frac=1.0, min_lr_ratio=0.0,
                    warmup_steps=0, eval_every=0, sample_every=0, log_every=1, checkpoint_every=0, seed=SEED,
                    ema=0.0, dtype="fp32", device="cpu", export_hf=False)
    sft(cfg, quiet=True)
    recs = [json.loads(l) for l in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines() if l.strip()]
    recs = [r for r in recs if "loss" in r and "step" in r]
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    cum = [r["trained_tokens"] for r in recs]
    assert [b - a for a, b in zip([0] + cum, cum)] == trl_run["trained"]
    assert_close([r["lr"] for r in recs], trl_run["lr"], "learning rate", tol=1e-12)
    assert_close([r["loss"] for r in recs], trl_run["loss"], f"per-step loss (sft, packing={packing})")


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # (PEFT's call)
def test_trl_peft_lora_equals_lmforge_sft_lora(exported, data, tmp_path):
    """LoRA: lmforge's sft (lora_r=4, alpha 8, every linear) against TRL training a PEFT adapter with the same
    initial weights (lmforge's init under the run's seed, written by ``save_peft`` and read by
    ``PeftModel.from_pretrained``). B starts at zero, so step 1 moves only B and the steps after it depend on
    A's init as well: equal losses mean the same adapter, the same trainable parameters and the same updates."""
    SFTConfig, sft = _sft_or_skip()
    from lmforge.align.lora import LoRAConfig, apply_lora, save_peft
    from lmforge.model import load

    lm_dir, hf_dir, _ = exported
    model, _ = load(lm_dir)
    torch.manual_seed(SEED)  # as SFTStage does before apply_lora
    apply_lora(model, LoRAConfig(r=4, alpha=8.0))
    adapter = save_peft(model, tmp_path / "init_adapter")
    theirs = run_trl(hf_dir, data[1], tmp_path / "trl", adapter=adapter)
    cfg = SFTConfig(out=str(tmp_path / "sft"), base=str(lm_dir), sources=[{"path": str(data[0])}], val_frac=0.0,
                    packing="none", loss_norm="token", lora_r=4, lora_alpha=8.0, batch_size=B, grad_accum=GA,
                    seq_len=SEQ, max_steps=STEPS, optimizer="adamw", lr=LR, weight_decay=WD, beta1=BETAS[0],
                    beta2=BETAS[1], grad_clip=CLIP, schedule="wsd", decay_frac=1.0, min_lr_ratio=0.0,
                    warmup_steps=0, eval_every=0, sample_every=0, log_every=1, checkpoint_every=0, seed=SEED,
                    ema=0.0, dtype="fp32", device="cpu", export_hf=False)
    sft(cfg, quiet=True)
    recs = [json.loads(l) for l in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines() if l.strip()]
    recs = [r for r in recs if "loss" in r and "step" in r]
    cum = [r["trained_tokens"] for r in recs]
    assert [b - a for a, b in zip([0] + cum, cum)] == theirs["trained"]
    assert theirs["loss"][-1] < theirs["loss"][0]
    assert_close([r["loss"] for r in recs], theirs["loss"], "per-step loss (LoRA)")
