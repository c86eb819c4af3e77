"""The preference stage (DPO and its family, KTO, ORPO, CPO, SimPO) on the shared training loop.

Knows how the stage is put together from the others' parts: the policy (``align.sft.load_base``: the
SFT model, an lmforge or HF directory; ``chat_spec`` its tokens; LoRA from ``align.lora``), the
reference (precomputed once, a frozen copy, or the policy with its adapters disabled), the
preference files (``align.pref_data``: read, checked, tokenized, batched, summed completion
log-probs; or generated first by ``align.pairs``), the losses (``align.pref_loss``), TRL's metric
names and how the run's result is written (as SFT writes it: ``<out>/`` an lmforge model directory,
``adapter/``, ``hf/``; plus ``ref_logps.json``, ``margins.png``). Knows nothing of the training step
itself: ``lmforge.train.loop.run`` drives the schedule, accumulation, clipping, evaluation,
checkpoints, exact resume and the metrics; this module hands it a ``DPOStage``.

Loss: the loop's contract is the SUM over ``n`` units: a micro-batch of B pairs returns
``per_pair.sum()`` with n = B, so the step's loss is the mean over its pairs (TRL's per-device mean
when the micro-batches are equal). Dropout is off in policy and reference (TRL's
``disable_dropout``): every ``nn.Dropout``, the attention's dropout, the model config's and the LoRA
adapter's.

Reference log-probs: "precomputed" scores every train and val example once, before step 1, with the
reference (the base: the policy itself before it moves, LoRA adapters disabled), stores them in the
examples and ``<out>/ref_logps.json`` (a resumed run reads them back) and keeps no reference model;
"copy" keeps a frozen deep copy (eval mode, no grad); "lora" runs the policy under
``lora.adapters_disabled``. KTO's KL term scores each prompt with another example's completion of the
same micro-batch, so its reference cannot be precomputed per example: KTO with ``kto_kl`` and
"precomputed" uses "copy" (final.json says which reference ran).

ORPO's NLL is TRL's: the token mean over the chosen sequences' every token after the first, prompt
included, read from the same forward as the completion log-probs (``_Tap``); CPO's and DPO's ``sft``
NLL cover the completion only, as TRL's.

On N data-parallel ranks each rank trains on its share of every global batch (``align.sft.RankShare``:
the pairs of one global batch cut into disjoint shares), which equals one process on the same global
batch, except KTO's KL term, whose mismatched pairs are drawn within each rank's share. The reference
log-probs are computed on every rank alike; rank 0 writes ``ref_logps.json``.
"""
from __future__ import annotations

import json
import logging
import time
import zlib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from ..train.loop import Batch, LoopConfig, check_loop_config

logger = logging.getLogger("lmforge.align")

REFERENCES = ("precomputed", "copy", "lora")
PACKING = ("padded", "packed")
METHODS = ("dpo", "kto", "orpo", "cpo", "simpo")
REFERENCE_FREE = ("orpo", "cpo", "simpo")
# lr = 0: the rate for the kind of run (TRL's 1e-6 default is for billion-parameter models). Full: chosen on the
# demo's SFT model (0.8M parameters, 602 dev pairs, 150 steps of 8, beta 0.1; docs/preference.md's sweep): sigmoid
# held-out reward accuracy 0.50 / 0.60 / 0.58 at 1e-4 / 3e-4 / 1e-3, and at 1e-3 kto and simpo collapse. LoRA:
# not measured (an adapter's usual 10x)
DEFAULT_LR = {"full": 3e-4, "lora": 3e-3}
LOSS_FIELDS = ("method", "loss_type", "loss_weights", "beta", "label_smoothing", "f_divergence_type",
               "f_alpha_divergence_coef", "discopop_tau", "desirable_weight", "undesirable_weight", "cpo_alpha",
               "simpo_gamma", "alpha", "ld_alpha", "use_weighting")


@dataclass
class DPOConfig(LoopConfig):
    # the loop's knobs, with preference defaults
    out: str = "runs/dpo"
    batch_size: int = 8  # pairs per micro-batch (examples for kto)
    seq_len: int = 256  # max prompt + completion tokens
    lr: float = 0.0  # 0: DEFAULT_LR for the run's kind
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    schedule: str = "constant"
    warmup_steps: int = 0
    max_steps: int = 100
    grad_clip: float = 1.0
    eval_every: int = 25
    eval_batches: int = 0  # 0: every held-out pair
    log_every: int = 5
    # the stage's own
    base: str = ""  # the SFT model (an lmforge model dir or HF dir); the policy starts here
    ref: str = ""  # "": the base is the reference; else another model dir (same tokenizer)
    reference: str = "precomputed"  # precomputed | copy | lora
    data: list[str] = field(default_factory=list)  # preference JSONL files (align.pref_data)
    pairs: dict = field(default_factory=dict)  # or generate them first: align.pairs.make_pairs kwargs
    on_error: str = "raise"  # a bad line in a data file: raise (FILE:LINE: FIELD) or skip (counted)
    val_frac: float = 0.1  # held-out pairs (by prompt)
    max_prompt_len: int = 0  # 0: seq_len
    truncation: str = "keep_start"
    packing: str = "padded"  # padded | packed (PrefBatches modes)
    shuffle: bool = True
    # PrefLossConfig's fields, flat
    method: str = "dpo"
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    loss_weights: list[float] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 1.0
    discopop_tau: float = 0.05
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    cpo_alpha: float = 1.0
    simpo_gamma: float = 0.5
    alpha: float = 0.0
    ld_alpha: float | None = None
    use_weighting: bool = False
    kto_kl: bool = True  # kto: the KL estimate from mismatched completions (false: KL = 0)
    # LoRA, as SFTConfig
    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=list)
    lora_rslora: bool = False
    export_hf: bool = True


def _loss_api():
    from . import pref_loss

    return pref_loss


def _data_api():
    from . import pref_data

    return pref_data


def loss_config(cfg: DPOConfig):
    """The ``PrefLossConfig`` of the run (its fields copied from the flat ``DPOConfig``)."""
    api = _loss_api()
    names = {f.name for f in fields(api.PrefLossConfig)}
    kw = {k: getattr(cfg, k) for k in LOSS_FIELDS if k in names}
    lt = list(cfg.loss_type)
    if lt == ["sigmoid"] and cfg.method in ("simpo", "kto"):  # the default loss name, for these methods' own
        kw["loss_type"] = ["simpo" if cfg.method == "simpo" else "kto"]
    return api.PrefLossConfig(**kw)


def check_config(cfg: DPOConfig) -> None:
    """Every setting checked before any work; errors name the field, the value and what was expected."""
    from .sft import check_tuning

    check_loop_config(cfg)
    if not cfg.base:
        raise ValueError("base: give the model to train (the SFT model: an lmforge model directory or an HF one), "
                         "e.g. --base runs/default/sft")
    for k, ok in (("reference", REFERENCES), ("packing", PACKING), ("method", METHODS),
                  ("on_error", ("raise", "skip"))):
        if getattr(cfg, k) not in ok:
            raise ValueError(f"{k}: expected one of {', '.join(ok)}, got {getattr(cfg, k)!r}")
    if not isinstance(cfg.loss_type, list) or not cfg.loss_type or not all(isinstance(t, str) for t in cfg.loss_type):
        raise ValueError(f"loss_type: expected a non-empty list of loss names, got {cfg.loss_type!r}")
    if not cfg.beta > 0:
        raise ValueError(f"beta: must be > 0 (the strength of the pull towards the reference; TRL's default 0.1), "
                         f"got {cfg.beta}")
    if not 0.0 <= cfg.label_smoothing < 0.5:
        raise ValueError(f"label_smoothing: expected a value in [0, 0.5) (the assumed share of flipped labels), "
                         f"got {cfg.label_smoothing}")
    if cfg.reference == "lora" and cfg.method not in REFERENCE_FREE and not cfg.lora_r:
        raise ValueError("reference: 'lora' (the policy with its adapters disabled) needs a LoRA run: set lora_r > 0 "
                         "(e.g. --lora-r 8), or use --reference precomputed / copy")
    if cfg.ref and cfg.method in REFERENCE_FREE:
        raise ValueError(f"ref: method {cfg.method!r} uses no reference model; drop ref = {cfg.ref!r}")
    check_tuning(cfg)
    if cfg.max_prompt_len < 0:
        raise ValueError(f"max_prompt_len: must be >= 0 (0: seq_len), got {cfg.max_prompt_len}")
    if not isinstance(cfg.data, list) or not all(isinstance(p, str) for p in cfg.data):
        raise ValueError(f"data: expected a list of JSONL paths, got {cfg.data!r}")
    if not isinstance(cfg.pairs, dict):
        raise ValueError(f"pairs: expected a table of align.pairs.make_pairs arguments, got {cfg.pairs!r}")
    if not cfg.data and not cfg.pairs:
        raise ValueError("data: no preference data: give --data FILE.jsonl (TRL's prompt/chosen/rejected or "
                         "prompt/completion/label format) or --pairs-from-tasks TASKS to generate pairs first")
    try:
        _loss_api().check_loss_config(loss_config(cfg))
    except ValueError as e:  # (its fields are DPOConfig's own, flat: name them as the user wrote them)
        raise ValueError(str(e).replace("PrefLossConfig.", "")) from None


def resolved_lr(cfg: DPOConfig) -> float:
    return cfg.lr or DEFAULT_LR["lora" if cfg.lora_r else "full"]


def disable_dropout(model) -> int:
    """Every dropout of ``model`` set to 0 (as TRL's ``disable_dropout``): ``nn.Dropout`` modules, the
    attention's ``dropout`` attribute, the config's ``dropout`` and LoRA's adapter dropout. Returns how
    many were non-zero."""
    from .lora import LoRALinear

    hit = 0
    cfg = getattr(model, "cfg", None)
    if cfg is not None and getattr(cfg, "dropout", 0):
        hit += 1
        cfg.dropout = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            hit += m.p != 0
            m.p = 0.0
        elif isinstance(m, LoRALinear):
            hit += m.lora_dropout != 0
            m.lora_dropout = 0.0
        elif isinstance(getattr(m, "dropout", None), float):
            hit += m.dropout != 0
            m.dropout = 0.0
    return int(hit)


def dropout_values(model) -> list[float]:
    """Every dropout probability in ``model`` (what ``disable_dropout`` zeroes), for tests and checks."""
    from .lora import LoRALinear

    out = []
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            out.append(float(m.p))
        elif isinstance(m, LoRALinear):
            out.append(float(m.lora_dropout))
        elif isinstance(getattr(m, "dropout", None), float):
            out.append(float(m.dropout))
    return out


def tokenizer_difference(a, b) -> str | None:
    """Why two tokenizers differ (vocabulary size, special ids, merges / vocabulary), or None when equal."""
    if type(a) is not type(b):
        return f"kinds differ ({type(a).__name__} vs {type(b).__name__})"
    if a.vocab_size != b.vocab_size:
        return f"vocab sizes differ ({a.vocab_size} vs {b.vocab_size})"
    if dict(a.special_tokens) != dict(b.special_tokens):
        diff = sorted(set(a.special_tokens.items()) ^ set(b.special_tokens.items()))[:4]
        return f"special token ids differ ({diff})"
    try:
        da, db = a.to_dict(), b.to_dict()
    except Exception:  # a tokenizer without a serialization: the checks above are what can be compared
        return None
    if da != db:
        keys = [k for k in sorted(set(da) | set(db)) if da.get(k) != db.get(k)]
        return f"their vocabularies / merges differ (fields {keys[:4]})"
    return None


class DPOStage:
    """The loop's Stage for preference training (``lmforge.train.loop.Stage``). Built from a
    ``DPOConfig``; the data is read, checked and tokenized, and the reference log-probs computed
    ("precomputed"), before step 1. ``model`` / ``ref_model``: objects for the Python API (the policy
    instead of loading ``cfg.base``; the reference instead of ``cfg.ref``)."""

    name = "dpo"

    def __init__(self, cfg: DPOConfig, device: torch.device | str = "cpu", *, model=None, ref_model=None,
                 strategy=None):
        from .sft import RankShare, chat_spec, check_base_fits, load_base, rank_place

        self.cfg, self.device = cfg, torch.device(device)
        rank, self.world, self.is_main = rank_place(strategy)
        self.lcfg = loss_config(cfg)
        self.lapi, self.dapi = _loss_api(), _data_api()
        self.method = cfg.method
        if model is not None and ref_model is not None and model is ref_model:
            raise ValueError("ref_model: the same object as model; the reference must be a separate frozen model "
                             "(pass a copy, or no ref_model: reference 'precomputed' / 'copy' / 'lora' builds one)")
        if model is not None:  # the policy given: cfg.base still names its tokenizer and tokens
            _, tok, spec = load_base(cfg.base)
        else:
            model, tok, spec = load_base(cfg.base)
        mc = model.cfg
        check_base_fits(cfg, mc)
        self.tokenizer = tok
        self.tokens = chat_spec(spec, tok)
        self.pad_id = self.tokens.pad if self.tokens.pad is not None else 0
        # the reference given or named: same tokenizer as the policy
        self.reference = "none" if cfg.method in REFERENCE_FREE else cfg.reference
        if ref_model is None and cfg.ref and self.reference != "none":
            from ..model import load

            ref_model, ref_tok = load(cfg.ref)
            why = tokenizer_difference(tok, ref_tok) if ref_tok is not None else "the reference has no tokenizer"
            if why:
                raise ValueError(f"ref: the tokenizer of {cfg.ref} differs from the policy's ({cfg.base}): {why}; "
                                 "the reference must score the same token ids")
        elif ref_model is not None:
            rtok = getattr(ref_model, "tokenizer", None)
            if rtok is not None and tokenizer_difference(tok, rtok):
                raise ValueError(f"ref_model: its tokenizer differs from the policy's ({cfg.base}): "
                                 f"{tokenizer_difference(tok, rtok)}")
            if getattr(ref_model.cfg, "vocab_size", mc.vocab_size) != mc.vocab_size:
                raise ValueError(f"ref_model: vocab_size {ref_model.cfg.vocab_size} differs from the policy's "
                                 f"{mc.vocab_size}; the reference must share the policy's tokenizer")
        if self.reference == "lora" and (ref_model is not None or cfg.ref):
            raise ValueError("reference: 'lora' uses the policy's own weights with the adapters disabled; it takes "
                             "no ref / ref_model (use 'copy' or 'precomputed' for a separate reference)")
        if cfg.method == "kto" and self.reference == "precomputed" and cfg.kto_kl:
            # KTO's KL term pairs each prompt with another example's completion within the micro-batch: the
            # reference's KL log-probs depend on the batching, so a reference model must stay in memory
            self.reference = "copy"
            logger.info("dpo: kto's KL term needs the reference on each micro-batch; reference 'copy' instead of "
                        "'precomputed' (kto_kl = false allows precomputed)")
        # the data: files (or generated pairs), the held-out share by prompt, tokens
        self.data_stats = {}
        rows = self._read_rows(model, tok)
        unpaired = cfg.method == "kto"
        kind = "unpaired" if unpaired else "paired"
        wrong = sum(r["kind"] != kind for r in rows)
        if unpaired and wrong:  # pairs for kto: each pair gives a desirable and an undesirable example
            rows = self.dapi.unpair_preferences(rows)
        elif wrong:
            raise ValueError(f"data: method {cfg.method!r} trains on pairs (prompt/chosen/rejected); {wrong} of "
                             f"{len(rows)} rows are unpaired (prompt/completion/label: method kto)")
        if not rows:
            made = self.data_stats.get("pairs")
            raise ValueError("data: no preference rows to train on (per file: " + str(self.data_stats.get("read"))
                             + (f"; generated pairs per task: { {t: v.get('pairs') for t, v in made.items()} }: the "
                                "model's answers were all right or all wrong; more samples (pairs.k), other tasks or "
                                "a higher temperature give pairs" if made else "") + ")")
        train, val = (self.dapi.split_validation_pairs(rows, cfg.val_frac, cfg.seed) if cfg.val_frac
                      else (rows, []))
        max_prompt = cfg.max_prompt_len or cfg.seq_len
        enc = lambda rs: self.dapi.encode_preferences(tok, rs, cfg.seq_len, max_prompt_len=max_prompt,  # noqa: E731
                                                      truncation=cfg.truncation, tokens=self.tokens)
        self.train_ex, st = enc(train)
        self.data_stats["train"] = st
        if not self.train_ex:
            raise ValueError(f"data: every training pair was dropped: {st} (seq_len {cfg.seq_len}, max_prompt_len "
                             f"{max_prompt}); give pairs whose chosen and rejected differ and whose prompt fits")
        self.val_ex, vst = enc(val) if val else ([], None)
        if vst:
            self.data_stats["val"] = vst
        # the model: LoRA from outside, dropout off; the reference
        torch.manual_seed(cfg.seed)
        if self.reference == "copy" and ref_model is None:
            import copy

            ref_model = copy.deepcopy(model)  # (before LoRA: the reference is the plain base)
        self.lora_names = []
        if cfg.lora_r:
            from .lora import apply_lora
            from .sft import _lora_config

            self.lora_names = apply_lora(model, _lora_config(cfg))
        self.model = model.to(self.device)
        self.dropout_disabled = disable_dropout(self.model)
        self.ref_model = None
        if ref_model is not None and self.reference in ("copy", "precomputed"):
            ref_model = ref_model.to(self.device)
            disable_dropout(ref_model)
            ref_model.eval()
            for p in ref_model.parameters():
                p.requires_grad_(False)
            self.ref_model = ref_model
        # N ranks: the source plans global batches (batch_size x ranks) and each rank builds its share
        self.batches = self._batches(self.train_ex, seed=cfg.seed, shuffle=cfg.shuffle, kl=unpaired and cfg.kto_kl)
        if self.world > 1:
            self.batches = RankShare(self.batches, rank, self.world)
        self.micro_batches = 0
        self._acc: dict[str, list[float]] = {}  # the metrics since the last log line: name -> [sum, count]
        self.quiet = False
        self.ref_seconds = 0.0

    # ---- data ----
    def _batches(self, ex, seed: int = 0, shuffle: bool = False, kl: bool = False):
        # (the global batch size: training cuts it into the ranks' shares; evaluation reads it all on each rank)
        return self.dapi.PrefBatches(ex, self.cfg.batch_size * self.world, mode=self.cfg.packing,
                                     pad_id=self.pad_id, seed=seed, shuffle=shuffle, device=str(self.device), kl=kl,
                                     seq_len=self.cfg.seq_len)

    def _read_rows(self, model, tok) -> list[dict]:
        cfg = self.cfg
        paths = [Path(p) for p in cfg.data]
        if cfg.pairs:
            paths.append(self._generate_pairs(model, tok))
        rows, per_file = [], {}
        for p in paths:
            if not p.exists():
                raise FileNotFoundError(f"data: {p}: no such file")
            r, st = self.dapi.read_preferences(p, on_error=cfg.on_error)
            rows += r
            per_file[str(p)] = st
        self.data_stats["read"] = per_file
        return rows

    def _generate_pairs(self, model, tok) -> Path:
        from .pairs import make_pairs, write_pairs

        out = Path(self.cfg.out) / "pairs.jsonl"
        if out.exists() and self.cfg.resume:  # a resumed run trains on the pairs it generated
            return out
        paired, unpaired, stats = make_pairs(model.to(self.device).eval(), tok, self.tokens,
                                             **dict(self.cfg.pairs))
        self.data_stats["pairs"] = stats
        write_pairs(unpaired if self.cfg.method == "kto" else paired, out)
        return out

    # ---- reference log-probs ----
    def _ref_logps(self, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the reference's summed log-probs per sequence of ``batch``, of its KL rows or None), no grad."""
        with torch.no_grad():
            if self.reference == "lora":
                from .lora import adapters_disabled

                with adapters_disabled(self.model):
                    out = self._logps(self.model, batch)
            else:
                out = self._logps(self.ref_model, batch)
        return out["logps"].detach(), out.get("kl_logps")

    def _logps(self, fwd, batch) -> dict:
        kw = {"ld_alpha": self.cfg.ld_alpha, "weighting": self.cfg.use_weighting}
        tap = _Tap(fwd) if self.method == "orpo" and _Tap.applies(fwd) else None
        out = self.dapi.completion_logps(tap or fwd, batch, **kw)
        if tap is not None and tap.h is not None:  # ORPO's NLL (TRL): the chosen rows' prompt tokens too
            out = {**out, **_prompt_logps(fwd, tap.h, batch)}
        if "kl_logps" not in out and self.method == "kto" and self.cfg.kto_kl:
            B = int(batch.n)
            out = dict(out)
            out["kl_logps"] = out["logps"][B:]
            out["logps"] = out["logps"][:B]
            if "tokens" in out:
                out["tokens"] = out["tokens"][:B]
        return out

    def precompute(self) -> None:
        """The reference's log-probs of every train and val example, stored in the examples and in
        ``<out>/ref_logps.json`` (a resumed run reads them back); no reference model is kept. Examples whose
        data file carried them (``ref_chosen_logps`` / ``ref_rejected_logps``, ``ref_logps``) keep those
        when every example has them."""
        from contextlib import nullcontext

        from .._io import write_json

        path = Path(self.cfg.out) / "ref_logps.json"
        sets = {"train": self.train_ex, "val": self.val_ex}
        key = {k: _fingerprint(ex) for k, ex in sets.items()}
        who = str(self.cfg.ref or self.cfg.base)
        has = lambda e: e.ref_chosen is not None and (e.rejected is None or e.ref_rejected is not None)  # noqa: E731
        self.ref_source = "computed"
        if path.exists():
            d = json.loads(path.read_text())
            if d.get("fingerprint") == key and d.get("reference") == who:
                for k, ex in sets.items():
                    for e, (c, r) in zip(ex, d[k]):
                        e.ref_chosen, e.ref_rejected = c, r
                self.ref_model, self.ref_source = None, f"read from {path.name}"
                return
        t0 = time.perf_counter()
        if all(has(e) for ex in sets.values() for e in ex):
            self.ref_source = "from the data"
        else:
            # the reference: the one given, else the base = the policy before its first step (adapters off)
            ref = self.ref_model if self.ref_model is not None else self.model
            if ref is self.model and self.lora_names:
                from .lora import adapters_disabled

                ctx = adapters_disabled(self.model)
            else:
                ctx = nullcontext()
            was = self.model.training
            ref.eval()
            try:
                with ctx, torch.no_grad():
                    for ex in sets.values():
                        if not ex:
                            continue
                        src = self._batches(ex)
                        for _ in range(len(src)):
                            b = src.next()
                            lp = self._logps(ref, b)["logps"].double().cpu().tolist()
                            idx = b.inputs["index"].cpu().tolist()
                            for j, i in enumerate(idx):
                                ex[i].ref_chosen = lp[j]
                                if ex[i].rejected is not None:
                                    ex[i].ref_rejected = lp[len(idx) + j]
            finally:
                self.model.train(was)
        self.ref_model = None
        if self.is_main:  # (every rank computed the same: one writes)
            write_json(path, {"reference": who, "fingerprint": key,
                              **{k: [[e.ref_chosen, e.ref_rejected] for e in ex] for k, ex in sets.items()}})
        self.ref_seconds = time.perf_counter() - t0

    # ---- the loss ----
    def _pair_loss(self, fwd, batch) -> tuple[torch.Tensor, dict]:
        """(per pair / example loss (B,), metrics) of one micro-batch: the policy's forward through ``fwd``,
        the reference's log-probs from the batch (precomputed) or from the reference model."""
        out = self._logps(fwd, batch)
        api, cfg, inp = self.lapi, self.lcfg, batch.inputs
        if self.method == "kto":
            ref_lp = ref_kl = None
            if self.reference == "precomputed":
                ref_lp = self._stored(inp, "ref_logps")
            else:
                ref_lp, ref_kl = self._ref_logps(batch)
            kl = out.get("kl_logps")
            lp = api.KTOLogps(logps=out["logps"], label=inp["label"].bool(),
                              kl_logps=kl.detach() if kl is not None else None, ref_logps=ref_lp,
                              ref_kl_logps=ref_kl)
            return api.kto_loss(cfg, lp)
        c, r = out["logps"].chunk(2)
        ct, rt = out["tokens"].float().chunk(2)
        kw = {}
        if self.reference == "precomputed":
            kw["ref_chosen"], kw["ref_rejected"] = self._stored(inp, "ref_chosen"), self._stored(inp, "ref_rejected")
        elif self.reference in ("copy", "lora"):
            rl, _ = self._ref_logps(batch)
            kw["ref_chosen"], kw["ref_rejected"] = rl.float().chunk(2)
        if self.cfg.use_weighting:
            kw["chosen_weight"], kw["rejected_weight"] = out["weight"].chunk(2)
        if "prompt_logps" in out:  # ORPO: the NLL over the chosen rows' prompt and completion (TRL)
            kw["nll_logps"], kw["nll_tokens"] = out["prompt_logps"] + c, out["prompt_tokens"] + ct
        lp = api.PairLogps(chosen=c, rejected=r, chosen_tokens=ct, rejected_tokens=rt, **kw)
        return api.preference_loss(cfg, lp)

    @staticmethod
    def _stored(inp: dict, key: str) -> torch.Tensor:
        if key not in inp:  # (precompute fills every example before step 1; a batch without them is a bug)
            raise RuntimeError(f"dpo: a batch without its precomputed {key} (examples {inp['index'].tolist()})")
        return inp[key].float()

    def _accumulate(self, acc: dict, metrics: dict) -> None:
        for k, v in metrics.items():
            v = v.detach().float()
            s = acc.setdefault(k, [0.0, 0])
            if v.dim() == 0:
                s[0] += float(v)
                s[1] += 1
            else:
                s[0] += float(v.sum())
                s[1] += v.numel()

    # ---- the Stage protocol ----
    def optimizers(self, cfg) -> list:
        from ..train.optim import build_optimizers

        return build_optimizers(self.model, cfg.optimizer, lr=resolved_lr(self.cfg), weight_decay=cfg.weight_decay,
                                betas=(cfg.beta1, cfg.beta2), muon_lr=cfg.muon_lr)

    def next_batch(self) -> Batch:
        self.micro_batches += 1
        return self.batches.next()

    def loss(self, fwd, batch) -> torch.Tensor:
        per, metrics = self._pair_loss(fwd, batch)
        if "share_weight" in batch.inputs:  # an empty share's stand-in (align.sft.RankShare): no loss, no metrics
            return per.sum() * batch.inputs["share_weight"]
        self._accumulate(self._acc, metrics)
        return per.sum()

    def has_split(self, split: str) -> bool:
        return split == "val" and bool(self.val_ex)

    @torch.no_grad()
    def evaluate(self, split: str, max_batches: int) -> dict:
        """The mean loss and TRL's metrics over the held-out pairs (every one unless ``max_batches`` > 0)."""
        if split != "val" or not self.val_ex:
            return {"loss": float("nan")}
        cfg = self.cfg
        src = self._batches(self.val_ex, kl=self.method == "kto" and cfg.kto_kl)
        k = len(src) if not max_batches else min(max_batches, len(src))
        was = self.model.training
        self.model.eval()
        acc, total, n = {}, 0.0, 0
        try:
            for _ in range(k):
                b = src.next()
                per, metrics = self._pair_loss(self.model, b)
                total += float(per.sum())
                n += per.numel()
                self._accumulate(acc, metrics)
        finally:
            self.model.train(was)
        out = {"loss": total / max(n, 1)}
        out.update({k: s / max(c, 1) for k, (s, c) in acc.items()})
        out["pairs"] = n
        return out

    def state_dict(self) -> dict:
        return {"batches": self.batches.state_dict(), "step": self.micro_batches,
                "metrics": {k: list(v) for k, v in self._acc.items()}}

    def load_state_dict(self, d: dict) -> None:
        self.batches.load_state_dict(d["batches"])
        self.micro_batches = int(d["step"])
        self._acc = {k: [float(v[0]), int(v[1])] for k, v in d.get("metrics", {}).items()}

    def start(self, resumed: bool) -> None:
        if self.reference == "precomputed":
            self.precompute()
        s, say = self.data_stats["train"], logger.debug if self.quiet else logger.info
        say(f"dpo: {len(self.train_ex)} training {'examples' if self.method == 'kto' else 'pairs'} ({s}), "
            f"{len(self.val_ex)} held out, {len(self.batches)} batches per epoch; method {self.method}, loss "
            f"{'+'.join(self.lcfg.loss_type) if isinstance(self.lcfg.loss_type, list) else self.lcfg.loss_type}, "
            f"beta {self.cfg.beta}, reference {self.reference}"
            + (f"; LoRA r={self.cfg.lora_r} on {len(self.lora_names)} matrices" if self.lora_names else ""))

    def sample(self, step: int) -> str | None:
        return None

    def flops_per_token(self) -> float | None:
        return None

    def log_metrics(self) -> dict:
        out = {k: round(s / max(c, 1), 6) for k, (s, c) in self._acc.items()}
        self._acc = {}
        return out

    def stats(self) -> dict:
        per_epoch = max(len(self.batches), 1)
        return {"data": self.data_stats, "pairs": len(self.train_ex), "val_pairs": len(self.val_ex),
                "reference": self.reference, "method": self.method, "loss_type": list(self.lcfg.loss_type),
                "beta": self.cfg.beta, "epochs": round(self.micro_batches / per_epoch, 4),
                "ref_seconds": round(self.ref_seconds, 3), "ref_logps": getattr(self, "ref_source", None),
                "dropout_disabled": self.dropout_disabled,
                "lora": ({"r": self.cfg.lora_r, "alpha": self.cfg.lora_alpha, "adapted": len(self.lora_names)}
                         if self.cfg.lora_r else None)}

    def finish(self, out: Path, final: dict) -> dict:
        """``out/`` an lmforge model directory (LoRA: merged), ``out/adapter/``, ``out/hf/``, ``margins.png``."""
        from .sft import save_tuned

        out = Path(out)
        trained = {"steps": final.get("step"), "tokens": final.get("tokens"), "dpo": {
            "base": str(self.cfg.base), "method": self.method, "loss_type": list(self.lcfg.loss_type),
            "beta": self.cfg.beta, "pairs": len(self.train_ex)}}
        self.model, extra = save_tuned(self.model, out, self.cfg, self.tokenizer, self.tokens, trained)
        d = self.stats()
        d["val"] = {k[4:]: v for k, v in final.items() if k.startswith("val_") and k[4:] in VAL_KEYS}
        try:
            plot_margins(out / "metrics.jsonl", out / "margins.png", final=final)
        except ImportError:
            logger.warning("no margins.png: matplotlib is not installed")
        except Exception as e:  # a plot is a convenience, never a failure
            logger.warning(f"no margins.png: {type(e).__name__}: {e}")
        (logger.debug if self.quiet else logger.info)(
            f"saved the preference-tuned model to {out} (chat with it: lmforge chat --checkpoint {out})")
        return {"dpo": d, **extra}


class _Tap:
    """An lmforge model as ``completion_logps`` calls it, keeping the hidden states of the forward (ORPO
    reads the chosen prompts' log-probs from the same forward)."""

    def __init__(self, model):
        self.m, self.h = model, None
        self.cfg = model.cfg

    @staticmethod
    def applies(fwd) -> bool:
        from .packing import _module

        return _module(fwd) is not None

    def hidden_states(self, *a, **kw):
        self.h = self.m.hidden_states(*a, **kw)
        return self.h

    def compute_logits(self, h):
        return self.m.compute_logits(h)


def _prompt_logps(model, h, batch) -> dict:
    """``nll_logps`` / ``nll_tokens`` (B,): the summed log-probs and the count of every token after a
    sequence's first in the B chosen sequences, prompt and completion (TRL ORPO's NLL, the chosen rows'
    attended tokens), from the hidden states ``h`` (R, T, C) of the batch's forward."""
    inp = batch.inputs
    B = int(batch.n)
    doc, pos, cm, idx = inp["doc_ids"], inp["position_ids"], inp["completion_mask"], inp["idx"]
    sel = (doc >= 0) & (doc < B) & (cm == 0) & (pos >= 1)  # prompt tokens with a prediction, chosen rows
    flat = sel.reshape(-1).nonzero().squeeze(1)
    seq = doc.reshape(-1).index_select(0, flat)
    tgt = idx.reshape(-1).index_select(0, flat)
    logits = model.compute_logits(h.reshape(-1, h.shape[-1]).index_select(0, flat - 1)).float()
    lp = torch.log_softmax(logits, -1).gather(1, tgt[:, None]).squeeze(1)
    s = torch.zeros(B, dtype=torch.float32, device=lp.device).index_add(0, seq, lp)
    n = torch.zeros(B, dtype=torch.float32, device=lp.device).index_add(0, seq, torch.ones_like(lp))
    return {"prompt_logps": s, "prompt_tokens": n}


VAL_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "kl", "pairs")


def _fingerprint(ex) -> int:
    h = 0
    for e in ex:
        h = zlib.crc32(np.asarray(list(e.prompt) + [-1] + list(e.chosen) + [-2] + list(e.rejected or []),
                                  dtype=np.int64).tobytes(), h)
    return h


def margin_series(metrics_path: Path, final: dict | None = None) -> dict:
    """What margins.png draws: (step, value) for the train and val reward margins and accuracies."""
    recs = [json.loads(ln) for ln in Path(metrics_path).read_text().splitlines() if ln.strip()]
    recs = [r for r in recs if "event" not in r]
    s = {}
    for name in ("rewards/margins", "rewards/accuracies"):
        s[f"train {name}"] = [(r["step"], r[name]) for r in recs if name in r]
        v = [(r["step"], r[f"val_{name}"]) for r in recs if f"val_{name}" in r]
        if final is not None and final.get(f"val_{name}") is not None:
            v = [p for p in v if p[0] != final.get("step")] + [(final["step"], final[f"val_{name}"])]
        s[f"val {name}"] = v
    return s


def plot_margins(metrics_path: Path, png: Path, final: dict | None = None) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = margin_series(metrics_path, final)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name, ylabel in ((a1, "rewards/margins", "reward margin (chosen - rejected)"),
                             (a2, "rewards/accuracies", "reward accuracy")):
        if s[f"train {name}"]:
            ax.plot(*zip(*s[f"train {name}"]), color="C0", label="train")
        if s[f"val {name}"]:
            ax.plot(*zip(*s[f"val {name}"]), "o-", color="C1", label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return s


def resume_command(cfg: DPOConfig) -> str:
    import shlex

    return f"lmforge dpo --config {shlex.quote(str(Path(cfg.out) / 'train_config.json'))} --resume"


def dpo(cfg: DPOConfig, *, on_step=None, quiet: bool = False, resume_hint: str | None = None, model=None,
        ref_model=None) -> dict:
    """Preference-train ``cfg.base`` (or ``model``) on ``cfg.data``'s pairs; returns final.json's dict.

    ``<out>/`` ends as an lmforge model directory, with metrics.jsonl (TRL's metric names), final.json
    (its ``dpo`` record: data stats, reference, method, loss types, val rewards / margins / accuracies),
    loss.png, margins.png, checkpoints; LoRA runs add ``adapter/``, ``export_hf`` adds ``hf/``."""
    from ..train import loop

    started = time.perf_counter()
    check_config(cfg)
    cfg = replace(cfg, lr=resolved_lr(cfg))
    loop.existing_run(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    from ..parallel import make_strategy

    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    strategy = make_strategy(cfg)  # (one process: "none"; under torchrun: joins the group)
    try:
        if strategy.name == "none":
            strategy.check(None)
        cfg = loop.per_rank_batch(cfg, strategy)
        device = strategy.device if strategy.world_size > 1 else loop.pick_device(cfg.device)
        stage = DPOStage(cfg, device, model=model, ref_model=ref_model, strategy=strategy)
    except BaseException:
        strategy.close()
        raise
    stage.started, stage.quiet = started, quiet or not strategy.is_main
    record = {"dpo": asdict(cfg), "model": stage.model.cfg.to_dict()}
    return loop.run(cfg, stage, on_step=on_step, quiet=quiet, resume_hint=resume_hint, config_record=record,
                    command=resume_command(cfg), strategy=strategy)


class _CallableModule(type(json)):
    """``lmforge.align.dpo`` is both this module and its function (as ``align.sft``)."""

    def __call__(self, *args, **kwargs):
        return dpo(*args, **kwargs)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule
