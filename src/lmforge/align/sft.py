"""Supervised fine-tuning (SFT): a base model trained on conversations, the assistant's tokens only.

Knows how the SFT stage is put together from the others' parts: the base model (an lmforge model
directory or an HF one), the conversations (``align.data``: files and the built-in generators,
``align.generators``), their tokens and rows (``align.packing``: the chat format's assistant-only
mask, packing, the loss), LoRA (``align.lora``), and how the run's result is written: ``<out>/`` an
lmforge model directory (merged weights, tokenizer, its ``TokenSpec`` with lmforge's chat
template), ``<out>/adapter/`` the PEFT adapter of a LoRA run, ``<out>/hf/`` the HF export carrying
the chat template. Knows nothing of the training step itself: ``lmforge.train.loop.run`` drives the
schedule, accumulation, clipping, evaluation, checkpoints, exact resume and the metrics; this module
hands it an ``SFTStage``.

Normalization: ``loss_norm = "token"`` (default) is the mean cross-entropy over every trained token
of an optimizer step (all its micro-batches together, as TRL's ``num_items_in_batch``);
``"conversation"`` is the mean over the step's conversations of each one's mean.

On N data-parallel ranks (``parallel``, ``lmforge sft --nproc N``) the batches are planned at the
global size (``batch_size`` per rank x ranks) and each rank builds its share (``RankShare``): disjoint
shares that together are the one-process batch, so the run equals one process on the same global
batch; every rank evaluates all of the held-out conversations; rank 0 alone samples and writes.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..train.loop import LoopConfig, check_loop_config

logger = logging.getLogger("lmforge.align")

PACKING = ("bfd", "none", "padding_free", "grouped")  # align.packing.MODES
TRUNCATION = ("truncate", "skip")
LOSS_NORM = ("token", "conversation")
ON_ERROR = ("raise", "skip")
# lr = 0: the rate for the kind of run. Measured on the pipeline's 0.8M-parameter base (DEFAULT_MIXTURE, bfd,
# 8 x 256, 150 steps, cosine): a full fine-tune reached val_loss 2.46 at 5e-4 and 1.63 at 2e-3; LoRA r=8 at 5e-3
# 3.76 at step 100 (its embeddings and head stay frozen: a base that never saw the chat tokens learns them slowly)
DEFAULT_LR = {"full": 2e-3, "lora": 5e-3}
SAMPLE_PROMPT = "Who are you?"


def _default_sources() -> list[dict]:
    from .generators import DEFAULT_MIXTURE

    return [dict(s) for s in DEFAULT_MIXTURE]


@dataclass
class SFTConfig(LoopConfig):
    # the loop's knobs, with SFT's defaults (a small model fine-tuned on CPU in minutes)
    out: str = "runs/sft"
    batch_size: int = 8  # rows of seq_len ("bfd"); conversations a micro-batch ("none", "grouped", "padding_free")
    seq_len: int = 256  # a row's length; a longer conversation is truncated or skipped (``truncation``)
    grad_accum: int = 1
    optimizer: str = "adamw"
    lr: float = 0.0  # 0: 2e-3 for a full fine-tune, 5e-3 with LoRA (DEFAULT_LR)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    schedule: str = "cosine"
    warmup_steps: int = 10
    max_steps: int = 300
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 0  # 0: every validation conversation
    final_eval_batches: int = 0
    sample_every: int = 0
    sample_tokens: int = 60
    sample_prompt: str = SAMPLE_PROMPT  # the user's message the sample answers (greedy, in the chat format)
    log_every: int = 10
    # SFT's own
    base: str = ""  # an lmforge model directory (a pretrain run's out, the pipeline's model/) or an HF one
    sources: list[dict] = field(default_factory=_default_sources)  # align.data.load_sources' sources
    data_dir: str = ""  # a `lmforge data prepare` directory, for the corpus generators (its train split)
    val_frac: float = 0.05  # share of the conversations held out for validation (by conversation)
    test_sources: list[dict] = field(default_factory=list)  # conversations for the final test_ loss ([]: none)
    on_error: str = "raise"  # a bad conversation in a file: raise (naming file:line:field) or skip (counted)
    packing: str = "bfd"  # bfd | none | padding_free | grouped (align.packing.SFTBatches)
    shuffle: bool = True  # a new seeded order each epoch; false: the mixture's order every epoch (SFTStage.order)
    truncation: str = "truncate"  # truncate | skip: a conversation longer than seq_len (counted)
    loss_norm: str = "token"  # token | conversation
    neftune_alpha: float = 0.0  # > 0: NEFTune noise on the embeddings while training
    lora_r: int = 0  # 0: a full fine-tune; > 0: LoRA of this rank (only the adapter trains)
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=list)  # []: align.lora.LoRAConfig's default
    lora_rslora: bool = False
    export_hf: bool = True  # also write <out>/hf/ (the HF export, with the chat template)
    check_overlap: bool = True  # count generated conversations that coincide with the evaluation's dev or
    # private items (align.generators.check_disjoint; expected 0, in final.json's sft.eval_overlap)


CHOICES = {"packing": PACKING, "truncation": TRUNCATION, "loss_norm": LOSS_NORM, "on_error": ON_ERROR}


def check_config(cfg: SFTConfig) -> None:
    """Every SFT setting checked before any work; errors name the field and what was expected."""
    check_loop_config(cfg)
    if not cfg.base:
        raise ValueError("base: give the model to fine-tune (an lmforge model directory or an HF one), "
                         "e.g. --base runs/default/model")
    for k, ok in CHOICES.items():
        if getattr(cfg, k) not in ok:
            raise ValueError(f"{k}: expected one of {', '.join(ok)}, got {getattr(cfg, k)!r}")
    check_tuning(cfg)
    if cfg.neftune_alpha < 0:
        raise ValueError(f"neftune_alpha: must be >= 0 (0: off), got {cfg.neftune_alpha}")
    for name in ("sources", "test_sources"):
        v = getattr(cfg, name)
        if not isinstance(v, list) or not all(isinstance(s, dict) for s in v):
            raise ValueError(f"{name}: expected a list of source tables ({{path = FILE}} or "
                             f"{{generator = NAME, n = N}}), got {v!r}")
    if not cfg.sources:
        raise ValueError("sources: no conversations to train on (give --data FILE.jsonl or --generators)")


def check_tuning(cfg) -> None:
    """The fine-tuning fields SFT and the preference stage share: the validation share, the rate, LoRA's rank,
    alpha, dropout and optimizer; errors name the field."""
    if not 0.0 <= cfg.val_frac < 1.0:
        raise ValueError(f"val_frac: expected a share in [0, 1), got {cfg.val_frac}")
    if cfg.lr < 0:
        raise ValueError(f"lr: must be >= 0 (0: the default for the run's kind), got {cfg.lr}")
    if cfg.lora_r < 0:
        raise ValueError(f"lora_r: must be >= 0 (0: a full fine-tune), got {cfg.lora_r}")
    if cfg.lora_r:
        if cfg.lora_alpha <= 0:
            raise ValueError(f"lora_alpha: must be > 0, got {cfg.lora_alpha}")
        if not 0.0 <= cfg.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout: expected a probability in [0, 1), got {cfg.lora_dropout}")
        if cfg.optimizer != "adamw":
            raise ValueError(f"optimizer: a LoRA run (lora_r = {cfg.lora_r}) trains its adapter with adamw, "
                             f"got {cfg.optimizer!r}")


def resolved_lr(cfg: SFTConfig) -> float:
    return cfg.lr or DEFAULT_LR["lora" if cfg.lora_r else "full"]


def _lora_config(cfg: SFTConfig):
    from .lora import LoRAConfig

    kw = dict(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, rslora=cfg.lora_rslora)
    if cfg.lora_targets:
        kw["targets"] = list(cfg.lora_targets)
    return LoRAConfig(**kw)


def load_base(base: str, device="cpu"):
    """(model, tokenizer, TokenSpec) of the base: an lmforge model directory or an HF one. Its tokenizer must
    have lmforge's chat tokens (SFT trains on ``lmforge.tokenize.chat.render``'s format)."""
    from ..model import load, load_tokens
    from ..tokenize.chat import CHAT_SPECIAL_TOKENS

    d = Path(base)
    if d.is_file():
        raise ValueError(f"base: {base} is a file; give the model directory that holds it ({d.parent})")
    if not d.is_dir():
        raise FileNotFoundError(f"base: {base}: no such model directory")
    if not (d / "config.json").exists():
        raise FileNotFoundError(f"base: {base}: no config.json (not a model directory: a pretrain run's --out, "
                                "the pipeline's model/, or an HF model directory)")
    model, tok = load(d, device=device)
    if tok is None:
        raise ValueError(f"base: {base} has no tokenizer (tokenizer.lmforge.json or tokenizer.json)")
    missing = [s for s in CHAT_SPECIAL_TOKENS if s not in tok.special_tokens]
    if missing:
        raise ValueError(f"base: the tokenizer of {base} lacks the chat tokens {missing}: SFT trains on lmforge's "
                         "chat format (lmforge.tokenize.chat); use a model whose tokenizer was trained with "
                         "lmforge.tokenize.special.default_special_tokens (every tokenizer `lmforge tokenizer train` "
                         "and the pipeline make has them)")
    return model, tok, load_tokens(d, tok)


def check_base_fits(cfg, mc) -> None:
    """A fine-tuning run's ``seq_len`` within the base's context, and (``export_hf``) the base exportable to HF:
    refused before any work, naming the field (SFT's and the preference stage's check)."""
    if cfg.seq_len > mc.max_seq_len:
        raise ValueError(f"seq_len: {cfg.seq_len} is longer than the base model's context (max_seq_len "
                         f"{mc.max_seq_len} in {cfg.base}); set seq_len <= {mc.max_seq_len}")
    if cfg.export_hf:
        from ..model.hf import check_exportable

        try:
            check_exportable(mc, mc.hf_family)
        except ValueError as e:
            raise ValueError(f"export_hf: the base {cfg.base} cannot be exported to HF ({e}); "
                             "set export_hf = false") from None


def save_tuned(model, out: Path, cfg, tokenizer, tokens, trained: dict):
    """Write a fine-tuning run's result: ``out/adapter/`` (PEFT format) and the merged weights for a LoRA run,
    ``out/`` an lmforge model directory (``trained`` recorded in its config), ``out/hf/`` with ``export_hf``.
    Returns (the saved model, {"adapter": path | None, "hf": path | None}). SFT's and the preference stage's."""
    from ..model import save

    extra = {"adapter": None, "hf": None}
    if cfg.lora_r:
        from .lora import merge_and_unload, save_peft

        extra["adapter"] = str(save_peft(model, out / "adapter", base=str(cfg.base)))
        model = merge_and_unload(model)
    model = model.cpu().eval()
    save(model, out, tokenizer=tokenizer, extra={"trained": trained}, tokens=tokens)
    if cfg.export_hf:
        from ..model.hf import export_hf

        extra["hf"] = str(export_hf(model, out / "hf", tokenizer=tokenizer, tokens=tokens))
    return model, extra


def chat_spec(spec, tok):
    """The fine-tuned model's TokenSpec: the base's, with lmforge's chat template and ``<|end|>`` the first stop
    id (a reply ends there); the pad token never one of the stop tokens (None when the tokenizer has no other)."""
    from ..tokenize.chat import CHAT_TEMPLATE, END

    end = tok.special_tokens[END]
    stop = [end] + [s for s in spec.stop if s != end]
    pad = spec.pad if spec.pad is not None and spec.pad not in stop else None
    if pad is None:
        pad = tok.special_tokens.get("<|pad|>")
    return replace(spec, template="lmforge", chat_template=CHAT_TEMPLATE, chat_stop=[], stop=stop, pad=pad)


def _unique_ids(convs: list[dict]) -> list[dict]:
    """The conversations with distinct ``id``s (a repeated one gets ``#2``, ``#3``...): examples name theirs."""
    seen: dict[str, int] = {}
    out = []
    for k, c in enumerate(convs):
        cid = str(c.get("id", k))
        seen[cid] = seen.get(cid, 0) + 1
        out.append(c if seen[cid] == 1 and "id" in c else {**c, "id": cid if seen[cid] == 1 else f"{cid}#{seen[cid]}"})
    return out


def _load_conversations(sources, cfg, what: str):
    from .data import load_sources

    try:
        return load_sources(sources, seed=cfg.seed, data_dir=cfg.data_dir or None, on_error=cfg.on_error)
    except ValueError as e:
        if what == "sources":
            raise
        raise ValueError(f"{what}: {e}") from None


class RankShare:
    """One data-parallel rank's share of a batch source that plans whole batches (``SFTBatches``,
    ``PrefBatches``: ``_plan`` / ``epoch`` / ``cursor`` / ``build``). The source is made at the global
    batch size (``batch_size`` x ranks); each global batch's rows (SFT) or examples (DPO) are cut into
    ``world`` contiguous shares, the first ones one row longer when they do not divide, and this rank
    builds its own: the ranks' shares are disjoint and together the one-process batch, and the state
    (the source's, whose ``batch_size`` is the global one) resumes on any world size of the same global
    batch. A rank whose share of a last, short batch is empty gets a stand-in (the batch's first row)
    with ``n = tokens = trained = 0`` and ``inputs["share_weight"] = 0``: it still runs the forward and
    backward a data-parallel step needs on every rank, and the stage's loss multiplies it by 0."""

    def __init__(self, source, rank: int, world: int):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, world_size={world})")
        self.source, self.rank, self.world = source, rank, world

    def share(self, items: list) -> list:
        k, w = len(items), self.world
        lo = self.rank * (k // w) + min(self.rank, k % w)
        return items[lo:lo + k // w + (1 if self.rank < k % w else 0)]

    def next(self):
        import dataclasses

        src = self.source
        if src._plan_epoch != src.epoch:
            src._plan, src._plan_epoch = src._make_plan(src.epoch), src.epoch
        items = src._plan[src.cursor]
        src.cursor += 1
        if src.cursor >= len(src._plan):
            src.epoch, src.cursor = src.epoch + 1, 0
        mine = self.share(list(items))
        if mine:
            return src.build(mine)
        b = src.build(list(items[:1]))
        return dataclasses.replace(b, inputs={**b.inputs, "share_weight": 0.0}, n=0, tokens=0, trained=0)

    def __len__(self) -> int:
        return len(self.source)

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, d: dict) -> None:
        self.source.load_state_dict(d)

    def __getattr__(self, name):  # order(), plan(), ...: the source's (the global batches)
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)


def rank_place(strategy) -> tuple[int, int, bool]:
    """(dp_rank, dp_size, is_main) of ``strategy`` (None: one process)."""
    if strategy is None:
        return 0, 1, True
    return strategy.dp_rank, strategy.dp_size, strategy.is_main


class SFTStage:
    """The loop's Stage for SFT (``lmforge.train.loop.Stage``): conversations in, the assistant's tokens
    trained. Built from an ``SFTConfig``; everything is read and checked here, before step 1."""

    name = "sft"

    def __init__(self, cfg: SFTConfig, device: torch.device | str = "cpu", strategy=None):
        from .data import split_validation
        from .packing import SFTBatches, encode

        self.cfg, self.device = cfg, torch.device(device)
        rank, world, _ = rank_place(strategy)
        self.world = world
        model, tok, spec = load_base(cfg.base)
        mc = model.cfg
        check_base_fits(cfg, mc)
        self.tokenizer, self.base_tokens = tok, spec
        self.tokens = chat_spec(spec, tok)
        # conversations: the mixture, then the validation share by conversation
        convs, self.source_stats = _load_conversations(cfg.sources, cfg, "sources")
        if not convs:
            raise ValueError(f"sources: no conversations left to train on (per source: {self.source_stats})")
        self.eval_overlap = None
        if cfg.check_overlap and any("generator" in src for src in cfg.sources):
            from .generators import check_disjoint

            self.eval_overlap = check_disjoint(convs, data_dir=cfg.data_dir or None)
            if any(self.eval_overlap.values()):
                logger.warning(f"sft: generated conversations coincide with evaluation items (dev or private): "
                               f"{ {k: v for k, v in self.eval_overlap.items() if v} }; scores on those tasks "
                               "are not held-out")
        train, val = split_validation(convs, cfg.val_frac, cfg.seed) if cfg.val_frac else (convs, [])
        train = _unique_ids(train)
        self.train_ex, self.train_stats = encode(tok, train, cfg.seq_len, cfg.truncation)
        self._convs = {c["id"]: c for c in train}
        if not self.train_ex:
            raise ValueError(f"no training conversation fits: {self.train_stats} (seq_len {cfg.seq_len}, "
                             f"truncation {cfg.truncation!r})")
        self.val_ex, self.val_stats = encode(tok, val, cfg.seq_len, cfg.truncation) if val else ([], None)
        self.test_ex, self.test_stats = [], None
        if cfg.test_sources:
            test, self.test_source_stats = _load_conversations(cfg.test_sources, cfg, "test_sources")
            self.test_ex, self.test_stats = encode(tok, test, cfg.seq_len, cfg.truncation)
        # the model: LoRA wraps it from outside (only the adapter trains)
        torch.manual_seed(cfg.seed)
        self.lora_names = []
        if cfg.lora_r:
            from .lora import apply_lora

            self.lora_names = apply_lora(model, _lora_config(cfg))
        self.model = model.to(self.device)
        self._neftune = None
        if cfg.neftune_alpha:
            from .packing import add_neftune

            self._neftune = add_neftune(self.model, cfg.neftune_alpha)
        self.pad_id = self.tokens.pad if self.tokens.pad is not None else 0  # (masked: its value is never seen)
        # N ranks: the source plans global batches (batch_size x ranks) and each rank builds its share
        self.batches = SFTBatches(self.train_ex, cfg.batch_size * world, cfg.seq_len, mode=cfg.packing,
                                  pad_id=self.pad_id, seed=cfg.seed, norm=cfg.loss_norm, device=str(self.device),
                                  shuffle=cfg.shuffle)
        if world > 1:
            self.batches = RankShare(self.batches, rank, world)
        self.micro_batches = 0  # consumed, for the epoch count (restored with the batch source)
        self.quiet = False  # (sft(quiet=True): the start's summary at debug level)

    def order(self, epoch: int = 0) -> list[dict]:
        """The training conversations in the order epoch ``epoch`` feeds them (micro-batch after micro-batch;
        with ``packing = "none"`` and batch_size B, micro-batch j is items [jB, (j+1)B)): what a reference
        trainer (TRL's SFTTrainer with a sequential sampler) must be given to see the same batches."""
        return [self._convs[self.train_ex[i].id] for i in self.batches.order(epoch)]

    # ---- the Stage protocol ----
    def optimizers(self, cfg) -> list[torch.optim.Optimizer]:
        from ..train.optim import build_optimizers

        # (build_optimizers covers the parameters that require grad: with LoRA, the adapter's only)
        return build_optimizers(self.model, cfg.optimizer, lr=resolved_lr(cfg), weight_decay=cfg.weight_decay,
                                betas=(cfg.beta1, cfg.beta2), muon_lr=cfg.muon_lr)

    def next_batch(self):
        self.micro_batches += 1
        return self.batches.next()

    def loss(self, fwd, batch) -> torch.Tensor:
        from .packing import sft_loss

        loss = sft_loss(fwd, batch, self.cfg.loss_norm)
        return loss * batch.inputs["share_weight"] if "share_weight" in batch.inputs else loss

    def has_split(self, split: str) -> bool:
        return bool({"val": self.val_ex, "test": self.test_ex}.get(split))

    @torch.no_grad()
    def evaluate(self, split: str, max_batches: int) -> dict[str, float]:
        """The mean loss (the training normalization) over the split's conversations, every one of them unless
        ``max_batches`` (> 0) stops earlier; ``conversations`` and ``trained_tokens``: what it covered."""
        from .packing import SFTBatches, sft_loss

        ex = {"val": self.val_ex, "test": self.test_ex}.get(split)
        if not ex:  # (val_frac = 0: the loop still asks for the final validation loss)
            return {"loss": float("nan")}
        cfg = self.cfg
        src = SFTBatches(ex, cfg.batch_size * self.world, cfg.seq_len, mode=cfg.packing, pad_id=self.pad_id,
                         seed=cfg.seed, norm=cfg.loss_norm, device=str(self.device))  # (every rank: all of them)
        k = len(src) if not max_batches else min(max_batches, len(src))
        was = self.model.training
        self.model.eval()
        total, n, trained = 0.0, 0, 0
        try:
            for _ in range(k):
                b = src.next()
                total += float(sft_loss(self.model, b, cfg.loss_norm))
                n += b.n
                trained += b.trained
        finally:
            self.model.train(was)
        loss = total / max(n, 1)
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "trained_tokens": trained}

    def state_dict(self) -> dict:
        return {"batches": self.batches.state_dict(), "step": self.micro_batches}

    def load_state_dict(self, d: dict) -> None:
        self.batches.load_state_dict(d["batches"])
        self.micro_batches = int(d["step"])

    def start(self, resumed: bool) -> None:
        s, say = self.train_stats, logger.debug if self.quiet else logger.info
        say(f"sft: {s['conversations']} training conversations ({s['trained_tokens']:,} trained of "
                    f"{s['tokens']:,} tokens; {s['truncated']} truncated, {s['skipped']} skipped), "
                    f"{len(self.val_ex)} validation, {len(self.batches)} batches per epoch"
                    + (f"; LoRA r={self.cfg.lora_r} on {len(self.lora_names)} matrices" if self.lora_names else ""))
        left = [name for name, st in self.source_stats.items() if st.get("note")]
        if left:
            say(f"sft: left out {', '.join(left)} ({self.source_stats[left[0]]['note']}; --data-dir DIR "
                        "gives them a `lmforge data prepare` directory)")

    def sample(self, step: int) -> str | None:
        if not self.cfg.sample_every:
            return None
        return self.reply([{"role": "user", "content": self.cfg.sample_prompt}], self.cfg.sample_tokens)

    def reply(self, messages, max_tokens: int = 60) -> str:
        """The model's greedy reply to ``messages`` in the chat format (what ``lmforge chat`` would say)."""
        from ..infer.loop import generate
        from ..tokenize.chat import render

        ids = render(self.tokenizer, messages, add_generation_prompt=True)[0]
        room = self.model.cfg.max_seq_len - len(ids)
        if room < 1:
            return ""
        out = generate(self.model, ids, min(max_tokens, room), temperature=0.0, stop=self.tokens.stop)
        return self.tokenizer.decode(out)

    def flops_per_token(self) -> float | None:
        fpt = getattr(self.model, "flops_per_token", None)
        return float(fpt(self.cfg.seq_len)) if fpt is not None else None

    def log_metrics(self) -> dict:
        return {}

    def stats(self) -> dict:
        """final.json's ``sft`` record: what was read, encoded, trained and how many epochs it took."""
        per_epoch = max(len(self.batches), 1)
        s = {"conversations": self.train_stats["conversations"], "examples": len(self.train_ex),
             "truncated": self.train_stats["truncated"],
             "skipped": self.train_stats["skipped"], "tokens": self.train_stats["tokens"],
             "trained_tokens": self.train_stats["trained_tokens"], "val_conversations": len(self.val_ex),
             "batches_per_epoch": per_epoch, "epochs": round(self.micro_batches / per_epoch, 4),
             "packing": self.cfg.packing, "loss_norm": self.cfg.loss_norm, "sources": self.source_stats,
             "eval_overlap": self.eval_overlap,
             "lora": ({"r": self.cfg.lora_r, "alpha": self.cfg.lora_alpha, "rslora": self.cfg.lora_rslora,
                       "adapted": len(self.lora_names),
                       "trainable_params": sum(p.numel() for p in self.model.parameters() if p.requires_grad)}
                      if self.cfg.lora_r else None)}
        if self.val_stats:
            s["val"] = self.val_stats
        if self.test_stats:
            s["test"] = self.test_stats
        return s

    def finish(self, out: Path, final: dict) -> dict:
        """Write ``out/`` as an lmforge model directory (LoRA: the merged weights), ``out/adapter/`` (LoRA) and
        ``out/hf/`` (export_hf); returns final.json's extra keys."""
        out = Path(out)
        if self._neftune is not None:
            self._neftune.remove()
            self._neftune = None
        trained = {"steps": final.get("step"), "tokens": final.get("tokens"), "sft": {
            "base": str(self.cfg.base), "lora_r": self.cfg.lora_r, "conversations": self.train_stats["conversations"]}}
        self.model, extra = save_tuned(self.model, out, self.cfg, self.tokenizer, self.tokens, trained)
        (logger.debug if self.quiet else logger.info)(
            f"saved the fine-tuned model to {out} (chat with it: lmforge chat --checkpoint {out})"
            + (f"; the adapter in {extra['adapter']}" if extra["adapter"] else "")
            + (f"; the HF export in {extra['hf']}" if extra["hf"] else ""))
        return {"sft": self.stats(), **extra}


def resume_command(cfg: SFTConfig) -> str:
    import shlex

    return f"lmforge sft --config {shlex.quote(str(Path(cfg.out) / 'train_config.json'))} --resume"


def sft(cfg: SFTConfig, *, on_step=None, quiet: bool = False, resume_hint: str | None = None) -> dict:
    """Fine-tune ``cfg.base`` on ``cfg.sources``' conversations; returns final.json's dict.

    ``<out>/`` ends as an lmforge model directory (``lmforge chat --checkpoint OUT`` works), with
    ``metrics.jsonl``, ``final.json``, ``loss.png`` and checkpoints as pre-training writes them; LoRA runs
    add ``<out>/adapter/`` (PEFT format), ``export_hf`` adds ``<out>/hf/``."""
    from ..train import loop

    from ..parallel import make_strategy

    started = time.perf_counter()
    check_config(cfg)
    cfg = replace(cfg, lr=resolved_lr(cfg))  # the rate the run uses, recorded in train_config.json
    loop.existing_run(cfg)  # a directory holding a run without --resume: refused before any work
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    strategy = make_strategy(cfg)  # (one process: "none"; under torchrun: joins the group)
    try:
        if strategy.name == "none":
            strategy.check(None)
        cfg = loop.per_rank_batch(cfg, strategy)
        device = strategy.device if strategy.world_size > 1 else loop.pick_device(cfg.device)
        stage = SFTStage(cfg, device, strategy=strategy)
    except BaseException:
        strategy.close()
        raise
    stage.started, stage.quiet = started, quiet or not strategy.is_main
    record = {"sft": asdict(cfg), "model": stage.model.cfg.to_dict()}
    return loop.run(cfg, stage, on_step=on_step, quiet=quiet, resume_hint=resume_hint, config_record=record,
                    command=resume_command(cfg), strategy=strategy)


class _CallableModule(type(json)):
    """``lmforge.align.sft`` is both this module and its function: ``from lmforge.align import sft`` may give
    either (Python binds a package's attribute to a submodule once it is imported), so the module calls
    ``sft`` too."""

    def __call__(self, *args, **kwargs):
        return sft(*args, **kwargs)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule
