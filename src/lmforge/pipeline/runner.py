"""The runner: a recipe's stages in order, each the same library call as its CLI stage.

Knows the stage order, the run directory and its manifest, and when a stage can
be skipped; knows nothing about how any stage works. ``runs/<name>/run.json``
records for every stage its key (a hash of its settings and of the previous
stage's outputs), its outputs' hashes, its time, status and key numbers.
Rerunning skips a stage whose key and outputs are unchanged; ``from_stage``
forces a stage and everything after it; an interrupted run continues with the
first unfinished stage (pre-training and SFT resume from their last checkpoint).
A training stage whose settings say ``nproc = N`` (N > 1) runs as ``lmforge <stage> --config`` on N
ranks through ``lmforge.parallel.launch`` (``parallel``: its strategy, ddp when "none"); its summary
in run.json and the report says which strategy ran on how many ranks.

A trained model is never deleted: when pre-training's (or SFT's) settings (or its inputs) changed, the
run in ``model/`` (``sft/``), finished or interrupted, is moved aside to ``model.prev-<its key>``
(``sft.prev-<its key>``) and listed in run.json's ``kept_runs``, then a new run starts (or, when the
settings are back to a kept run's, that run moves back and continues). ``from_stage`` does not rerun an
earlier stage whose settings changed: it stops with an error naming the stage to rerun from.
The log goes to ``run.log`` and to ``logging`` (logger ``lmforge.pipeline``); a Ctrl-C logs
a warning saying how to continue. The eval stage measures bits per byte (``eval.json``) and scores
the recipe's tasks (``lmforge eval --tasks``'s function) into ``eval/``; a task that fails is left
out with a warning, the others are scored.

With an ``sft`` stage (``lmforge sft``'s function on pretrain's model, into ``sft/``) the eval stage
scores both models: the base model as above, the SFT model's bits per byte (``eval.json``'s ``"sft"``:
what SFT costs on plain text), and, for every synthetic task of the eval set that SFT trained on
(a generator source of the same name), the before/after table (``sft_eval.json``): the base model
few-shot on plain prompts (its best, from ``eval/``), the base model and the SFT model zero-shot
through the chat template (``eval-base-chat/``, ``eval-sft/``), on the private split with intervals.
Export and demo then use the SFT model; the demo adds a chat transcript (``chat.json``).

With a ``dpo`` stage (``lmforge dpo``'s function on the SFT model, into ``dpo/``) the stage first makes its
preference pairs (``[dpo] pairs``: ``lmforge.align.pairs.make_pairs`` on the SFT model, the dev split of the
tasks [sft] trains, into ``dpo_pairs/``; reused while the SFT model and those arguments are unchanged, so a
changed loss setting or an interrupted run does not sample them again), then trains (``[dpo] data`` files
are added to the pairs; an interrupted run resumes from its checkpoint). The eval stage then also scores the
DPO model: its bits per byte (``eval.json``'s ``"dpo"``) and the trained tasks zero-shot through the chat
template (``eval-dpo/``: a ``dpo_chat`` cell in ``sft_eval.json``'s rows). Export and demo use the DPO model.

The quantize stage (``lmforge quantize``'s function, ``[quantize]``'s settings, calibration windows from the
run's train split) quantizes the final model into ``quantized/`` (``lmforge.quant.checkpoint.save_quantized``)
and writes the final fp32 model as GGUF (``export/model-<type>.gguf``, ``lmforge export --format gguf``'s
function) for llama.cpp. It measures both models the same way (``quant.json``): test bits per byte (the eval
stage's own code; the fp32 number is eval.json's when this run's eval stage scored the same model), the bytes
of the weights (in memory and model.safetensors) and greedy decode tokens/s through the engine (one run each,
the same prompt; whether the engine's C step ran it).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from .._io import file_sha256, write_json
from .recipe import STAGES, Recipe, recipe_dict


logger = logging.getLogger("lmforge.pipeline")


class StageError(RuntimeError):
    pass


class OutOfDateError(ValueError):
    """``--from STAGE`` while an earlier stage's settings changed: rerunning it is not what was asked."""


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_data(r: Recipe):
    """The data settings in effect: the recipe's, and for the built-in corpus (no inputs given) the
    corpus's own settings for every field the recipe left at its default."""
    import copy

    from .._config import apply_overrides
    from ..data.corpora import CORPORA, corpus_dir

    cfg = copy.deepcopy(r.data)
    if not cfg.inputs:
        cfg.inputs = [str(corpus_dir(r.fetch.corpus))]
        defaults = CORPORA[r.fetch.corpus].prepare_defaults
        fresh = type(cfg)()
        for k, v in defaults.items():
            sect, fld = k.split(".")
            if getattr(getattr(cfg, sect), fld) == getattr(getattr(fresh, sect), fld):
                apply_overrides(cfg, {k: v})
    return cfg


def resolved_recipe(r: Recipe) -> dict:
    """What runs: the recipe with the corpus's settings applied (``recipe.json``, ``run --print-config``)."""
    from .. import __version__

    d = recipe_dict(r)
    d["data"] = asdict(resolve_data(r))
    return {"lmforge_version": __version__, **d}


class Runner:
    def __init__(self, recipe: Recipe, run_dir: str | Path, quiet: bool = False):
        self.r = recipe
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.quiet = quiet
        self.log_path = self.dir / "run.log"
        mp = self.dir / "run.json"
        self.manifest = json.loads(mp.read_text()) if mp.exists() else {"stages": {}}
        self.results: dict[str, dict] = {}
        self._key = ""  # the running stage's key
        self._forced = False  # the running stage was asked for (from_stage), not found out of date

    def log(self, msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        with open(self.log_path, "a") as f:
            f.write(line + "\n")
        (logger.debug if self.quiet else logger.info)(msg)

    def rerun_command(self) -> str:
        """The command that continues this run (the same recipe, run directory and --set options)."""
        return f"lmforge run {self.r.name} --runs {self.dir.parent} --name {self.dir.name}"

    def save_manifest(self) -> None:
        write_json(self.dir / "run.json", self.manifest, indent=1)

    # ---- the stages: each returns (outputs: {name: path}, summary: dict) ----
    def stage_fetch(self):
        from ..data import fetch

        d = fetch(self.r.fetch.corpus, quiet=True)
        return {"corpus_manifest": d / "MANIFEST.json"}, {"corpus": str(d)}

    def _data_cfg(self):
        return resolve_data(self.r)

    def stage_clean(self):
        from ..data.prepare import clean_and_dedup

        summaries, dedup = clean_and_dedup(self._data_cfg(), self.dir / "data", quiet=self.quiet)
        self.results["clean"] = (summaries, dedup)
        return ({"dedup": self.dir / "data" / "work" / "dedup.json"},
                {"documents_in": sum(s.get("docs_in", 0) for s in summaries), "kept": dedup["kept"],
                 "near_duplicate_clusters": len(dedup["near_clusters"]), "val_documents": len(dedup["val"]),
                 "test_documents": len(dedup.get("test", []))})

    def stage_tokenizer(self):
        from .. import tokenize
        from ..data.prepare import clean_and_dedup, train_texts
        from ..tokenize.special import default_special_tokens

        summaries, dedup = clean_and_dedup(self._data_cfg(), self.dir / "data", quiet=True)  # reused, not redone
        t = self.r.tokenizer
        texts = list(train_texts(self.dir / "data", summaries, dedup))
        specials = default_special_tokens(t.kind)  # the family's own and the chat tokens (bpe: PIPELINE_SPECIAL_TOKENS)
        t0 = time.perf_counter()
        if t.kind == "bpe":
            tok = tokenize.train("bpe", texts, t.vocab_size, pattern=t.pattern, special_tokens=specials,
                                 show_progress=False)
        elif t.kind == "char":
            tok = tokenize.train("char", texts, 0, special_tokens=specials)
        else:
            tok = tokenize.train(t.kind, texts, t.vocab_size, special_tokens=specials, show_progress=False)
        out = self.dir / "tokenizer" / "tokenizer.lmforge.json"
        out.parent.mkdir(exist_ok=True)
        tok.save(out)
        nbytes = sum(len(x.encode()) for x in texts[:5])
        ntok = sum(len(tok.encode(x, disallowed_special=())) for x in texts[:5])
        return {"tokenizer": out}, {"kind": t.kind, "vocab_size": tok.vocab_size, "train_s": round(time.perf_counter() - t0, 2),
                                    "bytes_per_token": round(nbytes / max(ntok, 1), 3)}

    def stage_shards(self):
        from ..data.prepare import prepare
        from ..data.stats import collect

        prepare(self._data_cfg(), self.dir / "tokenizer", self.dir / "data", quiet=self.quiet)
        s = collect(self.dir / "data")
        return {"manifest": self.dir / "data" / "manifest.json"}, {
            k: s[k] for k in ("documents", "bytes", "tokens", "bytes_per_token")}

    def stage_pretrain(self):
        import copy

        from ..train import train

        cfg = copy.deepcopy(self.r.train)
        cfg.data, cfg.text, cfg.out = str(self.dir / "data"), "", str(self.dir / "model")
        cfg.resume = self._prepare_run_dir("pretrain", Path(cfg.out))  # an interrupted run with these settings continues
        final = self._train("pretrain", cfg, lambda: train(cfg, quiet=self.quiet, resume_hint=(
            f"rerun `{self.rerun_command()}` (with the same --set options) to continue")))
        keys = ("step", "tokens", "train_loss", "val_loss", "val_bpb", "test_bpb", "params", "elapsed")
        if final["resumed_from_step"] is not None:  # run.json shows that (and from where) this run continued
            self.log(f"pretrain: resumed from step {final['resumed_from_step']}, "
                     f"ran {final['steps_this_run']} more steps")
            keys += ("resumed_from_step", "steps_this_run")
        return {"model": Path(cfg.out) / "model.safetensors"}, {**{k: final[k] for k in keys}, **_ranks(final)}

    def _train(self, stage: str, cfg, here):
        """Run a training stage: in this process (``here()``), or, when its settings ask for more than one
        process (``nproc`` / ``nnodes``), as ``lmforge <stage> --config FILE`` on ``nproc`` ranks through
        ``parallel.launch`` (a subprocess; its settings file is ``<out>/launch_config.json``); returns its
        final.json dict."""
        from ..parallel.launch import launch

        if cfg.nproc <= 1 and cfg.nnodes <= 1:
            return here()
        if cfg.nnodes > 1:
            raise ValueError(f"{stage}.nnodes = {cfg.nnodes}: the pipeline launches on this machine only; run "
                             f"`lmforge {stage} --nnodes ...` on each node (docs/distributed.md)")
        if cfg.parallel == "none":
            cfg.parallel = "ddp"
            self.log(f"{stage}: nproc = {cfg.nproc} with parallel = 'none': running parallel = 'ddp'")
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        key = "train" if stage == "pretrain" else stage
        write_json(out / "launch_config.json", {key: asdict(cfg)}, indent=1)
        (out / "final.json").unlink(missing_ok=True)  # (what the launched run writes is what is read back)
        self.log(f"{stage}: {cfg.parallel} on {cfg.nproc} ranks (torchrun)")
        rc = launch([stage, "--config", str(out / "launch_config.json"), *(["--resume"] if cfg.resume else []),
                     *(["--quiet"] if self.quiet else [])], cfg.nproc, rdzv_timeout=cfg.dist_timeout)
        if rc == 130:
            raise KeyboardInterrupt
        if rc != 0 or not (out / "final.json").exists():
            raise RuntimeError(f"{stage}: the run on {cfg.nproc} ranks ({cfg.parallel}) failed with exit status {rc} "
                               f"(its output is above; its checkpoints, if any, are in {out})")
        return json.loads((out / "final.json").read_text())

    def _prepare_run_dir(self, stage: str, out: Path) -> bool:
        """The training run in ``out`` (pretrain's ``model/``, sft's ``sft/``) continues only if it was started
        for this stage key (same settings, same inputs); any other run there (finished or interrupted) is
        moved aside, never deleted; a kept run of this key comes back. Returns whether to resume."""
        from ..train.checkpoint import latest_checkpoint

        stamp = out / "pipeline_key.txt"
        mine = stamp.exists() and stamp.read_text().strip() == self._key
        redo = self._forced  # --from this stage (or earlier): train again, the run there kept aside
        if (redo or not mine) and out.exists() and (
                latest_checkpoint(out) is not None or (out / "model.safetensors").exists()):
            self._keep_aside(out, stamp.read_text().strip() if stamp.exists() else "",
                             "--from asked to train again" if redo and mine else
                             "settings or data changed since it was trained", stage)
        if not out.exists() and not redo:
            self._restore_kept(out, stage)
        ck = latest_checkpoint(out)
        if ck is not None:
            self.log(f"{stage}: resuming the interrupted run in {out} from its checkpoint {ck.name}")
        out.mkdir(parents=True, exist_ok=True)
        stamp.write_text(self._key + "\n")
        return ck is not None

    def sft_config(self):
        """The [sft] settings with the pipeline's own: base = pretrain's model, out = <run>/sft, the corpus
        generators reading the run's shards, no HF export of its own (the export stage makes it)."""
        import copy

        cfg = copy.deepcopy(self.r.sft)
        cfg.base, cfg.out, cfg.data_dir = str(self.dir / "model"), str(self.dir / "sft"), str(self.dir / "data")
        cfg.export_hf = False
        return cfg

    def stage_sft(self):
        from ..align.sft import sft

        cfg = self.sft_config()
        if not (Path(cfg.base) / "model.safetensors").exists():
            raise FileNotFoundError(f"sft: no base model in {cfg.base} (the pretrain stage makes it: add "
                                    "'pretrain' to stages or run it first)")
        cfg.resume = self._prepare_run_dir("sft", Path(cfg.out))
        final = self._train("sft", cfg, lambda: sft(cfg, quiet=self.quiet, resume_hint=(
            f"rerun `{self.rerun_command()}` (with the same --set options) to continue")))
        keys = ("step", "tokens", "trained_tokens", "train_loss", "val_loss", "test_loss", "elapsed")
        summary = {k: final[k] for k in keys if final.get(k) is not None}
        summary.update(_ranks(final))
        st = final.get("sft") or {}
        summary.update({k: st[k] for k in ("conversations", "epochs", "truncated", "skipped") if st.get(k) is not None})
        if cfg.lora_r:
            summary["lora_r"] = cfg.lora_r
        if final.get("resumed_from_step") is not None:
            self.log(f"sft: resumed from step {final['resumed_from_step']}, "
                     f"ran {final.get('steps_this_run')} more steps")
            summary.update(resumed_from_step=final["resumed_from_step"], steps_this_run=final.get("steps_this_run"))
        outs = {"sft_model": Path(cfg.out) / "model.safetensors"}
        if (Path(cfg.out) / "adapter" / "adapter_model.safetensors").exists():
            outs["sft_adapter"] = Path(cfg.out) / "adapter" / "adapter_model.safetensors"
        return outs, summary

    def _final_model(self) -> Path:
        """The model the stages after training use: the DPO model with a dpo stage, else the SFT model with an
        sft stage, else pretrain's."""
        return self.dir / ("dpo" if "dpo" in self.r.stages else "sft" if "sft" in self.r.stages else "model")

    def dpo_config(self, data: list[str] | None = None):
        """The [dpo] settings with the pipeline's own: base = the SFT model, out = <run>/dpo, the preference
        files (the generated pairs, then [dpo] data's), no pairs of its own to make (the stage made them), no HF
        export of its own (the export stage makes it)."""
        import copy

        cfg = copy.deepcopy(self.r.dpo)
        cfg.base, cfg.out = str(self.dir / "sft"), str(self.dir / "dpo")
        cfg.data = list(data if data is not None else []) + list(self.r.dpo.data)
        cfg.pairs, cfg.export_hf = {}, False
        return cfg

    def _pairs_key(self) -> str:
        """What the generated pairs depend on: the make_pairs arguments, the tasks and the SFT model's weights."""
        from .. import __version__
        from .recipe import pair_tasks

        sft_w = self.dir / "sft" / "model.safetensors"
        return _hash(["pairs", self.r.dpo.pairs, pair_tasks(self.r), file_sha256(sft_w) if sft_w.exists() else None,
                      __version__])

    def make_pairs(self) -> tuple[list[str], dict]:
        """[dpo] pairs from the SFT model (``lmforge.align.pairs.make_pairs``; the dev split only) into
        ``dpo_pairs/``: ``pairs.jsonl`` (paired, for DPO and the reference-free methods) or ``unpaired.jsonl``
        (KTO), ``stats.json``. Pairs made under the same key (arguments, tasks, SFT weights) are reused.
        Returns the preference files for the stage and the pairs' stats."""
        from ..align import pairs as P
        from .recipe import pair_tasks

        d = self.dir / "dpo_pairs"
        key = self._pairs_key()
        kind = "unpaired" if self.r.dpo.method == "kto" else "pairs"
        stamp, stats_p = d / "key.txt", d / "stats.json"
        if stamp.exists() and stamp.read_text().strip() == key and stats_p.exists() and (d / f"{kind}.jsonl").exists():
            self.log(f"dpo: the pairs in {d} were made from this SFT model with these settings: reused")
            return [str(d / f"{kind}.jsonl")], json.loads(stats_p.read_text())
        from ..infer.llm import load_with_tokenizer

        model, tok, spec = load_with_tokenizer(self.dir / "sft")
        model.eval()
        kw = {k: v for k, v in self.r.dpo.pairs.items() if k != "tasks"}
        kw.setdefault("split", "dev")
        t0 = time.perf_counter()
        paired, unpaired, stats = P.make_pairs(model, tok, spec, pair_tasks(self.r), data_dir=self.dir / "data", **kw)
        seconds = round(time.perf_counter() - t0, 2)
        d.mkdir(parents=True, exist_ok=True)
        stamp.unlink(missing_ok=True)  # (a half-written set is never taken for a finished one)
        P.write_pairs(paired, d / "pairs.jsonl")
        P.write_pairs(unpaired, d / "unpaired.jsonl")
        record = {"tasks": stats, "seconds": seconds, "paired": len(paired), "unpaired": len(unpaired),
                  "args": {**self.r.dpo.pairs, "tasks": pair_tasks(self.r), "split": kw["split"]}}
        write_json(stats_p, record, indent=1)
        stamp.write_text(key + "\n")
        self.log(f"dpo: {len(paired)} pairs ({len(unpaired)} unpaired answers) from "
                 f"{sum(t.get('prompts', 0) for t in stats.values() if isinstance(t, dict))} dev prompts in {seconds}s")
        return [str(d / f"{kind}.jsonl")], record

    def stage_dpo(self):
        from ..align.dpo import dpo

        if not (self.dir / "sft" / "model.safetensors").exists():
            raise FileNotFoundError(f"dpo: no SFT model in {self.dir / 'sft'} (the sft stage makes it: add 'sft' to "
                                    "stages or run it first)")
        files, pstats = self.make_pairs() if self.r.dpo.pairs else ([], None)
        made = pstats is not None and pstats["unpaired" if self.r.dpo.method == "kto" else "paired"] > 0
        if pstats is not None and not made:
            per = ", ".join(f"{t}: {s.get('pairs', 0)} of {s.get('prompts', 0)} prompts ({s.get('all_correct', 0)} "
                            f"all correct, {s.get('all_wrong', 0)} all wrong)"
                            for t, s in pstats["tasks"].items() if isinstance(s, dict))
            if not self.r.dpo.data:
                raise ValueError(f"dpo: the SFT model made no preference pairs ({per}): a pair needs a correct and an "
                                 "incorrect answer to one prompt; raise dpo.pairs.k or n (or the temperature), train "
                                 "the SFT model longer, or give preference files in dpo.data")
            self.log(f"dpo: the SFT model made no pairs ({per}); training on dpo.data only")
        cfg = self.dpo_config(files if made else [])
        cfg.resume = self._prepare_run_dir("dpo", Path(cfg.out))
        final = self._train("dpo", cfg, lambda: dpo(cfg, quiet=self.quiet, resume_hint=(
            f"rerun `{self.rerun_command()}` (with the same --set options) to continue")))
        keys = ("step", "train_loss", "val_loss", "elapsed")
        summary = {k: final[k] for k in keys if final.get(k) is not None}
        summary.update(_ranks(final))
        summary.update({k: v for k, v in heldout(final).items() if v is not None})
        if pstats is not None:  # made by the SFT model (paired; kto: every labelled answer)
            summary["pairs_made"] = pstats["paired"] if self.r.dpo.method != "kto" else pstats["unpaired"]
            summary["pairs_s"] = pstats["seconds"]
        d = final.get("dpo") or {}
        summary.update({k: d[k] for k in ("pairs", "val_pairs", "ref_seconds") if d.get(k) is not None})  # trained on
        summary["method"] = self.r.dpo.method
        if self.r.dpo.method == "dpo":
            summary["loss_type"] = ",".join(self.r.dpo.loss_type)
        if final.get("resumed_from_step") is not None:
            self.log(f"dpo: resumed from step {final['resumed_from_step']}, "
                     f"ran {final.get('steps_this_run')} more steps")
            summary.update(resumed_from_step=final["resumed_from_step"], steps_this_run=final.get("steps_this_run"))
        outs = {"dpo_model": Path(cfg.out) / "model.safetensors", "dpo_final": Path(cfg.out) / "final.json"}
        if pstats is not None:
            outs["dpo_pairs"] = Path(files[0])
            outs["dpo_pairs_stats"] = self.dir / "dpo_pairs" / "stats.json"
        return outs, summary

    def _keep_aside(self, model_dir: Path, old_key: str, reason: str, stage: str = "pretrain") -> Path:
        """Move a run of other settings out of ``model_dir`` to ``<its name>.prev-<old key>`` (a numbered name
        if that is taken), log it and list it in run.json's ``kept_runs``."""
        base = f"{model_dir.name}.prev-{old_key[:12] or 'unknown'}"
        dest, n = model_dir.with_name(base), 2
        while dest.exists():
            dest, n = model_dir.with_name(f"{base}-{n}"), n + 1
        finished = (model_dir / "final.json").exists()
        model_dir.rename(dest)
        self.manifest.setdefault("kept_runs", []).append(
            {"path": str(dest), "key": old_key or None, "finished": finished,
             "moved": time.strftime("%Y-%m-%dT%H:%M:%S"), "reason": reason,
             **({"stage": stage} if stage != "pretrain" else {})})
        self.save_manifest()
        self.log(f"{stage}: {reason}: the {'finished' if finished else 'interrupted'} run in {model_dir} "
                 f"is kept in {dest} (delete it when no longer needed); starting a new run in {model_dir}")
        return dest

    def _restore_kept(self, model_dir: Path, stage: str = "pretrain") -> None:
        """Settings switched back to a kept run's: that run (finished or interrupted) returns to
        ``model_dir`` and continues (a finished one only redoes its final evaluation)."""
        kept = self.manifest.get("kept_runs", [])
        for i in reversed(range(len(kept))):  # the latest run of these settings
            k = kept[i]
            p = Path(k["path"])
            if k.get("key") == self._key and (p / "pipeline_key.txt").exists() and \
                    (p / "pipeline_key.txt").read_text().strip() == self._key:
                p.rename(model_dir)
                del self.manifest["kept_runs"][i]
                self.save_manifest()
                self.log(f"{stage}: these settings' run was kept in {p}; moved back to {model_dir} to continue")
                return

    def _bpb(self, model_dir: Path) -> dict:
        from ..evaluate.perplexity import evaluate_shards
        from ..infer.llm import load_with_tokenizer

        model, tok, spec = load_with_tokenizer(model_dir)
        # test is the reported number; validation is the one settings were chosen on
        ev = {sp: evaluate_shards(model, self.dir / "data", sp, self.r.train.seq_len, batch_size=8)
              for sp in ("test", "val")}
        keys = ("loss", "perplexity", "bits_per_byte", "tokens", "bytes", "documents")
        return {"split": "test", **{k: ev["test"][k] for k in keys}, "val": {k: ev["val"][k] for k in keys}}

    def stage_eval(self):
        from ..infer.llm import load_with_tokenizer
        from ..infer.loop import generate

        res = self._bpb(self.dir / "model")
        model, tok, spec = load_with_tokenizer(self.dir / "model")
        samples = []
        for i, p in enumerate(self.r.eval.prompts):
            out = generate(model, spec.encode_prompt(tok, p), self.r.eval.sample_tokens,
                           temperature=self.r.eval.temperature, seed=self.r.eval.seed + i, stop=spec.stop)
            samples.append({"prompt": p, "completion": tok.decode(out)})
        res["samples"] = samples
        del model
        sft = "sft" in self.r.stages or "dpo" in self.r.stages  # (dpo: on an SFT model an earlier run made)
        if sft:  # what SFT costs on plain text: the same measurement on the SFT model
            res["sft"] = {"model": "sft", **self._bpb(self.dir / "sft")}  # (relative: a run's files name no path)
        if "dpo" in self.r.stages:  # and on the DPO model
            res["dpo"] = {"model": "dpo", **self._bpb(self.dir / "dpo")}
        write_json(self.dir / "eval.json", res, indent=1)
        outs = {"eval": self.dir / "eval.json"}
        summary = {"test_bpb": res["bits_per_byte"], "test_loss": res["loss"], "val_bpb": res["val"]["bits_per_byte"]}
        if sft:
            summary["sft_test_bpb"] = res["sft"]["bits_per_byte"]
        if "dpo" in res:
            summary["dpo_test_bpb"] = res["dpo"]["bits_per_byte"]
        if self.r.eval.tasks:
            outs_t, summary_t = self._eval_tasks()
            outs.update(outs_t)
            summary.update(summary_t)
            if sft:
                outs_s, summary_s = self._eval_sft_tasks()
                outs.update(outs_s)
                summary.update(summary_s)
        return outs, summary

    def sft_tasks(self) -> list[str]:
        """The eval set's synthetic tasks that SFT trained on: a task whose built-in generator is a
        synthetic one (not a corpus task, not a program task) that is also a generator source of [sft]."""
        from ..evaluate import builtin
        from ..evaluate.run import task_names
        from ..evaluate.task import load_tasks

        trained = {src.get("generator") for src in self.r.sft.sources if isinstance(src, dict)}
        names = task_names(",".join(self.r.eval.tasks))
        out = []
        for t in load_tasks(names):
            gen = (t.config or {}).get("generator")
            if gen in builtin.GENERATORS and gen not in builtin.CORPUS and gen != "python" and gen in trained:
                out.append(t.name)
        return out

    def _eval_sft_tasks(self):
        """The before/after table (``sft_eval.json``): each trained synthetic task of the eval set on the private
        split, the base model few-shot on plain prompts (``eval/``, already scored) and both models zero-shot
        through the chat template (``eval-base-chat/``, ``eval-sft/``), with the intervals of each."""
        from ..evaluate.run import evaluate_checkpoint

        tasks = self.sft_tasks()
        if not tasks:
            self.log("eval: no synthetic task of the eval set is trained by [sft] (a generator source of the same "
                     "name): no before/after table")
            return {}, {}
        e = self.r.eval
        t0 = time.perf_counter()
        kw = dict(limit=e.limit, split="test", num_fewshot=0, apply_chat_template=True, bootstrap=e.bootstrap,
                  seed=e.seed, data_dir=self.dir / "data", progress=not self.quiet)
        dpo = "dpo" in self.r.stages
        try:
            sft_res, sft_paths = evaluate_checkpoint(self.dir / "sft", tasks, out=self.dir / "eval-sft", **kw)
            base_res, base_paths = evaluate_checkpoint(self.dir / "model", tasks, out=self.dir / "eval-base-chat", **kw)
            if dpo:
                dpo_res, dpo_paths = evaluate_checkpoint(self.dir / "dpo", tasks, out=self.dir / "eval-dpo", **kw)
        except Exception as err:  # the base model's scorecard and both bits per byte stand without the table
            msg = f"eval: the before/after table is left out: scoring {', '.join(tasks)} through the chat template " \
                  f"failed ({type(err).__name__}: {err})"
            logger.warning(msg)
            with open(self.log_path, "a") as f:
                f.write(f"{time.strftime('%H:%M:%S')} {msg}\n{traceback.format_exc()}")
            return {}, {"sft_tasks": 0, "sft_tasks_error": f"{type(err).__name__}: {err}"}
        fewshot = json.loads((self.dir / "eval" / "result.json").read_text()) \
            if (self.dir / "eval" / "result.json").exists() else {"tasks": {}}
        ev = json.loads((self.dir / "eval.json").read_text())

        def cell(res: dict, name: str, shots) -> dict | None:
            t = res.get("tasks", {}).get(name)
            if t is None:
                return None
            m = t["metrics"][t["primary"]]
            return {"metric": t["primary"], "value": m.get("value"), "ci": m.get("ci"), "n": t["n"],
                    "split": t.get("split"), "num_fewshot": shots}

        rows = {}
        for name in tasks:
            shots = (fewshot.get("settings") or {}).get("num_fewshot")
            if shots is None:
                from ..evaluate.task import load_tasks

                shots = load_tasks([name])[0].num_fewshot
            rows[name] = {"base_fewshot": cell(fewshot, name, shots), "base_chat": cell(base_res, name, 0),
                          "sft_chat": cell(sft_res, name, 0)}
            if dpo:
                rows[name]["dpo_chat"] = cell(dpo_res, name, 0)
        table = {"tasks": rows, "split": "private",
                 "bits_per_byte": {"split": "test", "base": ev["bits_per_byte"], "sft": ev["sft"]["bits_per_byte"]}}
        if dpo:  # the tasks DPO made pairs for (the others are scored too: what DPO did to them)
            table["dpo_trained"] = [n for n in tasks if n in self.dpo_tasks()]
            table["bits_per_byte"]["dpo"] = ev["dpo"]["bits_per_byte"]
        write_json(self.dir / "sft_eval.json", table, indent=1)  # (no times in it: the same run, the same bytes)
        seconds = round(time.perf_counter() - t0, 2)
        gains = [r["sft_chat"]["value"] - r["base_fewshot"]["value"] for r in rows.values()
                 if r["sft_chat"] and r["base_fewshot"] and None not in (r["sft_chat"]["value"], r["base_fewshot"]["value"])]
        summary = {"sft_tasks": len(rows), "sft_tasks_s": seconds}
        if gains:
            summary["sft_mean_gain"] = round(sum(gains) / len(gains), 4)
        outs = {"sft_eval": self.dir / "sft_eval.json", "sft_eval_result": sft_paths["result"],
                "base_chat_result": base_paths["result"]}
        if dpo:
            outs["dpo_eval_result"] = dpo_paths["result"]
            dg = [r["dpo_chat"]["value"] - r["sft_chat"]["value"] for n, r in rows.items() if n in table["dpo_trained"]
                  and r["dpo_chat"] and r["sft_chat"] and None not in (r["dpo_chat"]["value"], r["sft_chat"]["value"])]
            if dg:
                summary["dpo_mean_gain"] = round(sum(dg) / len(dg), 4)
        return outs, summary

    def dpo_tasks(self) -> list[str]:
        """The eval set's tasks the dpo stage made pairs for (``recipe.pair_tasks``), when [dpo] makes pairs."""
        from ..evaluate.run import task_names
        from .recipe import pair_tasks

        if not self.r.dpo.pairs:
            return []
        trained = set(pair_tasks(self.r))
        return [t for t in task_names(",".join(self.r.eval.tasks)) if t in trained]

    def _eval_tasks(self):
        """The [eval] tasks on the run's model (``lmforge eval --tasks``'s function): split both, contamination
        against the run's training shards, the report in ``eval/``. A task that fails to load or score is
        logged and left out (the others are still scored); all failing fails the stage."""
        from ..evaluate.run import evaluate_checkpoint, task_names

        e = self.r.eval
        names = task_names(",".join(e.tasks))
        out = self.dir / "eval"
        kw = dict(limit=e.limit, split="both", bootstrap=e.bootstrap, seed=e.seed, data_dir=self.dir / "data",
                  decontaminate=True, out=out, progress=not self.quiet)
        t0 = time.perf_counter()
        try:
            result, paths = evaluate_checkpoint(self.dir / "model", names, **kw)
        except Exception as err:  # find the task(s) at fault, score the rest
            self.log(f"eval: the tasks failed together ({type(err).__name__}: {err}); trying them one by one")
            good = []
            for n in names:
                try:
                    evaluate_checkpoint(self.dir / "model", [n], **{**kw, "bootstrap": 0, "progress": False,
                                                                    "out": self.dir / "eval.check"})
                    good.append(n)
                except Exception as e1:
                    logger.warning(f"eval: task {n} left out: {type(e1).__name__}: {e1}")
                    with open(self.log_path, "a") as f:
                        f.write(f"{time.strftime('%H:%M:%S')} eval: task {n} left out: {type(e1).__name__}: {e1}\n")
            import shutil

            shutil.rmtree(self.dir / "eval.check", ignore_errors=True)
            if not good:
                raise
            result, paths = evaluate_checkpoint(self.dir / "model", good, **kw)
            result["left_out"] = sorted(set(names) - set(good))
            from ..evaluate import report

            paths = report.write(result, out)
        seconds = round(time.perf_counter() - t0, 2)
        core = (result.get("aggregate") or {}).get("core") or {}
        summary = {"core": core.get("value"), "tasks": len(result["tasks"]), "tasks_s": seconds}
        outs = {"eval_result": paths["result"], "scorecard": paths["scorecard"]}
        return outs, summary

    def stage_quantize(self):
        from ..infer.llm import load_with_tokenizer
        from ..quant.api import quantize
        from ..quant.checkpoint import load_quantized, save_quantized
        from .recipe import quant_config, resolve_gguf

        src = self._final_model()
        if not (src / "model.safetensors").exists():
            raise FileNotFoundError(f"quantize: no model in {src} (the {src.name if src.name != 'model' else 'pretrain'} "
                                    "stage makes it: add it to stages or run it first)")
        q = self.r.quantize
        cfg = quant_config(q)
        model, tok, spec = load_with_tokenizer(src)
        model.eval()
        fp32 = self._measure(model, tok, spec, src, bpb=self._eval_bpb(src.name))
        gguf, gtype, no_gguf = None, *resolve_gguf(model.cfg, q.gguf)
        if gtype is None:
            self.log(f"quantize: no GGUF ({no_gguf})")
        else:  # from the fp32 weights (llama.cpp's types quantize them their own way)
            from ..quant.gguf_model import export_gguf

            t0 = time.perf_counter()
            path = Path(export_gguf(model, self.dir / "export" / f"model-{gtype}.gguf", tok, tokens=spec, type=gtype))
            gguf = {"type": gtype, "path": str(path.relative_to(self.dir)), "bytes": path.stat().st_size,
                    "seconds": round(time.perf_counter() - t0, 2)}
        t0 = time.perf_counter()
        qreport = quantize(model, cfg, data_dir=self.dir / "data", progress=not self.quiet)
        q_seconds = round(time.perf_counter() - t0, 2)
        out = Path(save_quantized(model, self.dir / "quantized", tokenizer=tok, tokens=spec))
        del model
        qmodel, qtok = load_quantized(out)  # what the directory holds is what is measured
        quant = self._measure(qmodel, qtok, spec, out)
        fp32_out, q_out = fp32.pop("output"), quant.pop("output")
        same = next((i for i, (a, b) in enumerate(zip(fp32_out, q_out)) if a != b), min(len(fp32_out), len(q_out)))
        layers = (qreport or {}).get("layers") or {}
        errs = [v["err"] for v in layers.values() if isinstance(v, dict) and isinstance(v.get("err"), (int, float))]
        record = {"source": src.name, "config": cfg.to_dict(), "quantize_s": q_seconds, "quantized_layers": len(layers),
                  "mean_layer_err": None if not errs else sum(errs) / len(errs),
                  "fp32": fp32, "quantized": quant, "gguf": gguf, **({"no_gguf": no_gguf} if gguf is None else {}),
                  "decode": {"prompt": q.prompt, "max_tokens": q.decode_tokens, "greedy": True, "runs": 1,
                             "threads": torch_threads(), "same_greedy_prefix": same},
                  "report": qreport}
        write_json(self.dir / "quant.json", record, indent=1)
        outs = {"quantized": out / "model.safetensors", "quantized_config": out / "config.json",
                "quant": self.dir / "quant.json"}
        if gguf:
            outs["gguf"] = self.dir / gguf["path"]
        summary = {"method": cfg.method, "bits": cfg.bits, "fp32_test_bpb": fp32["test_bpb"],
                   "quant_test_bpb": quant["test_bpb"],
                   "bpb_change": round(quant["test_bpb"] - fp32["test_bpb"], 6),
                   "weight_bytes": quant["weight_bytes"], "fp32_weight_bytes": fp32["weight_bytes"],
                   "decode_tok_s": quant["decode_tok_s"], "fp32_decode_tok_s": fp32["decode_tok_s"],
                   "quantize_s": q_seconds}
        if gguf:
            summary["gguf_bytes"] = gguf["bytes"]
        return outs, summary

    def _eval_bpb(self, which: str) -> dict | None:
        """This run's eval stage's test bits per byte of the model ``which`` (model, sft, dpo) from eval.json, when
        the stage is in the recipe and finished (the quantize stage then need not measure the same thing twice)."""
        p = self.dir / "eval.json"
        st = self.manifest.get("stages", {}).get("eval", {})
        if "eval" not in self.r.stages or st.get("status") != "done" or not p.exists():
            return None
        ev = json.loads(p.read_text())
        ev = ev if which == "model" else ev.get(which)
        if not ev or ev.get("split") != "test":
            return None
        return {"test_bpb": ev["bits_per_byte"], "test_loss": ev["loss"], "from": "eval.json"}

    def _measure(self, model, tok, spec, model_dir: Path, bpb: dict | None = None) -> dict:
        """One model's row of quant.json: test bits per byte (the eval stage's code: the whole test split at
        [train] seq_len), the weights' bytes (every tensor of the state dict, a tied one once:
        ``quant.api.model_bytes``; model.safetensors on disk), and one greedy decode through the engine
        (tokens/s, whether its C step ran it and why not, the tokens)."""
        from ..evaluate.perplexity import evaluate_shards
        from ..infer.engine import Engine
        from ..infer.fastpath import FastDecoder
        from ..infer.sampling import SamplingParams
        from ..quant.api import model_bytes

        if bpb is None:
            t0 = time.perf_counter()
            ev = evaluate_shards(model, self.dir / "data", "test", self.r.train.seq_len, batch_size=8)
            bpb = {"test_bpb": ev["bits_per_byte"], "test_loss": ev["loss"],
                   "seconds": round(time.perf_counter() - t0, 2)}
        weight_bytes = model_bytes(model)
        q = self.r.quantize
        prompt = spec.encode_prompt(tok, q.prompt)
        n = max(1, min(q.decode_tokens, model.cfg.max_seq_len - len(prompt)))
        eng = Engine(model)
        why = None if eng.fast is not None else (FastDecoder.why_not(model) or "the engine did not use it")
        eng.generate([prompt], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))  # (not timed: warm-up)
        t0 = time.perf_counter()
        out = eng.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))[0]
        dt = time.perf_counter() - t0
        return {**bpb, "weight_bytes": weight_bytes, "file_bytes": (model_dir / "model.safetensors").stat().st_size,
                "decode_tok_s": round(len(out) / dt, 1), "decode_tokens": len(out), "fast_decode": why is None,
                **({"fast_decode_why_not": why} if why else {}), "output": list(out)}

    def stage_export(self):
        from ..infer.llm import load_with_tokenizer
        from ..model import export_hf

        if self.r.export.arch == "none":
            return {}, {"skipped": "export.arch = none"}
        model, tok, spec = load_with_tokenizer(self._final_model())
        out = export_hf(model, self.dir / "hf", arch=self.r.export.arch or None, tokenizer=tok, tokens=spec)
        return {"hf_weights": out / "model.safetensors"}, {"hf_dir": str(out), "arch": self.r.export.arch or model.cfg.hf_family}

    def stage_demo(self):
        from ..infer.engine import Engine
        from ..infer.llm import load_with_tokenizer
        from ..infer.sampling import SamplingParams

        # plain prompts continue text: the base (pretrained) model's job (SFT trades some of it away, as the
        # report's bits per byte show); the chat transcript below is the SFT model's
        model, tok, spec = load_with_tokenizer(self.dir / "model")
        eng = Engine(model)
        prompts = [spec.encode_prompt(tok, p) for p in self.r.demo.conversation]
        outs = eng.generate(prompts, SamplingParams(max_tokens=self.r.demo.max_tokens, temperature=0.8, seed=1,
                                                    stop_token_ids=list(spec.stop)))
        demo = [{"prompt": p, "completion": tok.decode([t for t in o if t not in spec.stop])}
                for p, o in zip(self.r.demo.conversation, outs)]
        write_json(self.dir / "demo.json", demo, indent=1)
        outs_, summary = {"demo": self.dir / "demo.json"}, {"replies": len(demo)}
        if ("sft" in self.r.stages or "dpo" in self.r.stages) and self.r.demo.chat:
            outs_["chat"] = self._chat_transcript()
            summary["chat_turns"] = len(self.r.demo.chat)
        return outs_, summary

    def _chat_transcript(self) -> Path:
        """One conversation with the final model (the DPO model with a dpo stage, else the SFT model; ``lmforge
        chat``'s Python API): each of [demo] chat's user turns, then the model's greedy reply, every turn seeing
        the ones before (trimmed to the context)."""
        from ..infer.llm import load

        which = self._final_model().name
        lm = load(self.dir / which)
        messages: list[dict] = []
        finish = []
        for turn in self.r.demo.chat:
            messages.append({"role": "user", "content": turn})
            fitted, _ = lm.fit_messages(messages, reserve=max(1, min(self.r.demo.chat_max_tokens, lm.max_context - 1)))
            room = lm.max_context - len(lm.encode_chat(fitted))
            reply = lm.chat(fitted, max_tokens=max(1, min(self.r.demo.chat_max_tokens, room)), temperature=0.0)
            messages.append(reply.message)
            finish.append(reply.finish_reason)
        write_json(self.dir / "chat.json", {"model": which, "messages": messages,
                                            "finish_reasons": finish}, indent=1)
        return self.dir / "chat.json"

    # ---- the loop ----
    def run(self, from_stage: str | None = None) -> dict:
        if from_stage is not None and from_stage not in self.r.stages:
            raise ValueError(f"--from {from_stage!r}: not a stage of this recipe ({', '.join(self.r.stages)})")
        data = asdict(self._data_cfg())
        if from_stage is not None:  # before anything is written
            self._check_before(from_stage, data)
        write_json(self.dir / "recipe.json", resolved_recipe(self.r), indent=1)
        prev = ""
        forced = False
        t_run = time.perf_counter()
        stages = self.manifest.setdefault("stages", {})
        for i, name in enumerate(self.r.stages, 1):
            forced = forced or name == from_stage
            key = self._stage_key(name, data, prev)
            old = stages.get(name, {})
            outputs_ok = self._outputs_ok(old)
            if not forced and old.get("status") == "done" and old.get("key") == key and outputs_ok:
                self.log(f"[{i}/{len(self.r.stages)}] {name}: unchanged, skipped")
                prev = _hash([key, old["outputs"]])
                continue
            self.log(f"[{i}/{len(self.r.stages)}] {name} ...")
            self._key = key  # pretrain resumes only a run started under the same key
            self._forced = forced
            stages[name] = {"status": "running", "key": key, "started": time.time()}
            self.save_manifest()
            t0 = time.perf_counter()
            try:
                outs, summary = getattr(self, f"stage_{name}")()
            except KeyboardInterrupt as e:
                stages[name]["status"] = "interrupted"
                self.save_manifest()
                msg = f"interrupted in stage {name}"
                if not getattr(e, "lmforge_told", False):  # the trainer's own warning names its checkpoint
                    logger.warning(f"{msg}; finished stages are kept: rerun `{self.rerun_command()}` "
                                   "(with the same --set options) to continue")
                with open(self.log_path, "a") as f:
                    f.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
                raise
            except Exception as e:
                stages[name].update(status="failed", error=f"{type(e).__name__}: {e}")
                self.save_manifest()
                with open(self.log_path, "a") as f:
                    f.write(traceback.format_exc())
                raise StageError(f"stage {name!r} failed: {type(e).__name__}: {e} (log: {self.log_path})") from e
            hashes = {str(p): file_sha256(p) for p in outs.values()}
            stages[name] = {"status": "done", "key": key, "started": stages[name]["started"],
                            "seconds": round(time.perf_counter() - t0, 2), "outputs": hashes, "summary": summary}
            self.save_manifest()
            prev = _hash([key, hashes])
            self.log(f"[{i}/{len(self.r.stages)}] {name}: done in {stages[name]['seconds']}s {json.dumps(summary)}")
        from .report import write_report

        summary = write_report(self.dir, self.r, self.manifest, time.perf_counter() - t_run)
        return summary


    def _stage_key(self, name: str, data: dict, prev: str) -> str:
        from .. import __version__

        settings = {"fetch": asdict(self.r.fetch), "clean": data,
                    "tokenizer": asdict(self.r.tokenizer), "shards": data,
                    "pretrain": asdict(self.r.train), "sft": self._sft_settings(), "dpo": self._dpo_settings(),
                    "eval": asdict(self.r.eval), "quantize": asdict(self.r.quantize),
                    "export": asdict(self.r.export), "demo": asdict(self.r.demo)}[name]
        return _hash([name, settings, prev, __version__])  # a new lmforge reruns what it would do differently

    def _sft_settings(self) -> dict:
        """[sft]'s settings and the contents of its data files (a changed JSONL reruns SFT)."""
        files = {}
        for src in self.r.sft.sources:
            if isinstance(src, dict) and isinstance(src.get("path"), str) and Path(src["path"]).is_file():
                files[src["path"]] = file_sha256(src["path"])
        return {"settings": asdict(self.r.sft), "files": files}

    def _dpo_settings(self) -> dict:
        """[dpo]'s settings and the contents of its preference files (a changed JSONL reruns DPO)."""
        files = {p: file_sha256(p) for p in self.r.dpo.data if isinstance(p, str) and Path(p).is_file()}
        return {"settings": asdict(self.r.dpo), "files": files}

    @staticmethod
    def _outputs_ok(old: dict) -> bool:
        return bool(old.get("outputs")) and all(
            Path(p).exists() and file_sha256(p) == h for p, h in old["outputs"].items())

    def _check_before(self, from_stage: str, data: dict) -> None:
        """``--from STAGE`` redoes STAGE and what follows; an earlier stage that ran before but is now out
        of date (its settings, its inputs or its outputs changed) would be rerun silently (pre-training:
        retrained), so it is an error that names the stage to start from. Stages that never ran just run."""
        stages = self.manifest.get("stages", {})
        prev = ""
        for name in self.r.stages[:self.r.stages.index(from_stage)]:
            key, old = self._stage_key(name, data, prev), stages.get(name, {})
            if not old:
                return  # from here on nothing ran: the stages run in order as usual
            if old.get("status") != "done" or old.get("key") != key or not self._outputs_ok(old):
                why = ("did not finish" if old.get("status") != "done" else
                       "its settings (or an earlier stage's outputs) changed" if old.get("key") != key else
                       "its outputs changed or are missing")
                raise OutOfDateError(
                    f"--from {from_stage}: stage {name!r} is out of date ({why} since it ran), and --from "
                    f"{from_stage} would redo it{' (retrain the model)' if name == 'pretrain' else ''} "
                    f"first; rerun with --from {name} (or without --from) to redo it and what follows")
            prev = _hash([key, old["outputs"]])


def _ranks(final: dict) -> dict:
    """What a training stage's summary says of its parallelism: ``{"parallel": "ddp on 2 ranks"}``, or
    nothing for a one-process run."""
    p = final.get("parallel")
    if not p or (p.get("strategy") == "none" and p.get("world_size", 1) == 1):
        return {}
    return {"parallel": f"{p['strategy']} on {p['world_size']} rank{'s' if p['world_size'] != 1 else ''}"}


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def heldout(final: dict) -> dict:
    """The DPO run's held-out pairs from its final.json: reward margin, accuracy, loss, chosen and rejected
    rewards (TRL's metric names under ``val_``); None where the run did not report one."""
    d = final.get("dpo") or {}
    val = d.get("val") if isinstance(d.get("val"), dict) else {}

    def pick(name):
        for src, k in ((val, name), (d, f"val_{name}"), (final, f"val_{name}"), (val, f"val_{name}")):
            if isinstance(src.get(k), (int, float)):
                return float(src[k])
        return None

    return {"val_margin": pick("rewards/margins"), "val_accuracy": pick("rewards/accuracies"),
            "val_chosen": pick("rewards/chosen"), "val_rejected": pick("rewards/rejected")}


def run_recipe(recipe: Recipe, run_dir, from_stage=None, quiet=False) -> dict:
    if set(recipe.stages) - set(STAGES):
        raise ValueError("unknown stages")
    return Runner(recipe, run_dir, quiet).run(from_stage)
