"""The run's report: ``report.md`` for people, ``summary.json`` (and the last printed line) for machines.

Knows where each stage leaves its numbers; knows nothing about running them. The data
throughput it reports ("MB/s end to end") is the pipeline's whole data stage: the input's
bytes over the clean stage's and the shards stage's recorded seconds (run.json) together;
fetching and the tokenizer's training (its own row) are not in it. ``data prepare`` alone
times the same work in one call (data/report.json); in a pipeline that call only makes the
shards, so its own figure would leave the cleaning out.

With an sft stage the report adds the SFT section: its training numbers (run.json), the
before/after task table (``sft_eval.json``: each trained synthetic task on the private split, the base
model few-shot on plain prompts and zero-shot through the chat template, the SFT model zero-shot through
the chat template, 95% intervals), both models' test bits per byte on plain text (``eval.json``) and the
demo's chat transcript (``chat.json``).

With a dpo stage it adds the preference section: the pairs' yield per task (``dpo_pairs/stats.json``: dev
prompts, sampled answers, correct ones, prompts that gave a pair, all-correct and all-wrong prompts), the
run's training numbers and its held-out pairs' reward margin and accuracy (``dpo/final.json``), the SFT vs
DPO table (``sft_eval.json``'s ``sft_chat`` and ``dpo_chat`` cells: the private split, 95% intervals, the
tasks DPO trained marked) and the SFT and DPO models' test bits per byte; the chat transcript is then the
DPO model's.

With a quantize stage it adds the quantization section (``quant.json``): the final fp32 model beside the
quantized one (test bits per byte and the change, the weights' bytes in memory and on disk, greedy decode
tokens/s through the engine and whether its C step ran), the GGUF file's size, and the commands that run the
GGUF in llama.cpp (``llama-cli``, ``llama_cpp.Llama``).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .._io import write_json


_SPLIT_NAMES = {"test": "Test split (held-out documents never used to choose settings; the reported number)",
                "val": "Validation split (held-out documents used to choose settings and during training)"}


def _headline(summary: dict) -> str:
    if not summary["bits_per_byte"]:
        return ""
    line = f"Test bits per byte: **{summary['bits_per_byte']:.4f}**" if summary["split"] == "test" else \
        f"Validation bits per byte: **{summary['bits_per_byte']:.4f}** (this run has no test split)"
    if summary.get("val_bits_per_byte") and summary["split"] == "test":
        line += f" (validation: {summary['val_bits_per_byte']:.4f})"
    return line


def data_throughput(manifest: dict, bytes_in) -> dict | None:
    """The data stage's time and speed from the stages' recorded times: {"seconds": {"clean": s,
    "shards": s, "total": s}, "mb_per_s": input MB / total}; None without both times or the input size."""
    st = manifest.get("stages", {})
    secs = {k: st.get(k, {}).get("seconds") for k in ("clean", "shards")}
    if bytes_in is None or any(v is None for v in secs.values()):
        return None
    total = sum(secs.values())
    return {"seconds": {**secs, "total": round(total, 3)},
            "mb_per_s": round(bytes_in / 1e6 / max(total, 1e-9), 3)}


def _task_result(run_dir: Path, stages: dict) -> dict | None:
    """The eval stage's task result (eval/result.json) when this run's eval stage wrote it (not a stale one)."""
    p = run_dir / "eval" / "result.json"
    if not p.exists() or str(p) not in (stages.get("eval", {}).get("outputs") or {}):
        return None
    from ..evaluate.report import load

    return load(p)


def _stage_file(run_dir: Path, stages: dict, stage: str, name: str) -> dict | None:
    """A JSON file a stage of this run wrote (listed in its outputs in run.json: not a stale one)."""
    p = run_dir / name
    if not p.exists() or str(p) not in (stages.get(stage, {}).get("outputs") or {}):
        return None
    return json.loads(p.read_text())


def _cell(c: dict | None) -> str:
    """``0.420 [0.330, 0.510]`` (a score and its 95% interval), ``-`` when not scored."""
    if not c or c.get("value") is None:
        return "-"
    ci = f" [{c['ci'][0]:.3f}, {c['ci'][1]:.3f}]" if c.get("ci") else ""
    return f"{c['value']:.3f}{ci}"


def sft_markdown(st: dict, table: dict | None, ev: dict, chat: dict | None) -> list[str]:
    """The SFT section: training, the before/after table, bits per byte on plain text, the transcript."""
    s = st.get("sft", {}).get("summary") or {}
    lines = ["", "## Instruction tuning (SFT)", ""]
    if s:
        what = f"LoRA rank {s['lora_r']}" if s.get("lora_r") else "full fine-tuning"
        lines += [f"{what} of the pretrained model on the [sft] mixture: " + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items() if k != "lora_r")
            + " (`sft/`: the model, metrics.jsonl, loss.png)"]
    if table and table.get("tasks"):
        shots = {r["base_fewshot"]["num_fewshot"] for r in table["tasks"].values() if r.get("base_fewshot")}
        k = f"{shots.pop()}-shot" if len(shots) == 1 else "few-shot"
        lines += ["", "### Before and after", "",
                  f"The trained synthetic tasks on the private split (never trained on, never tuned on; "
                  f"95% bootstrap intervals): the base model {k} on plain prompts (its best), the base model "
                  f"and the SFT model zero-shot through the chat template (`eval/`, `eval-base-chat/`, `eval-sft/`).",
                  "", f"| task | metric | n | base, {k} plain | base, chat 0-shot | SFT, chat 0-shot |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, r in table["tasks"].items():
            any_c = r.get("sft_chat") or r.get("base_chat") or r.get("base_fewshot") or {}
            lines.append(f"| {name} | {any_c.get('metric', '-')} | {any_c.get('n', '-')} | {_cell(r.get('base_fewshot'))} "
                         f"| {_cell(r.get('base_chat'))} | {_cell(r.get('sft_chat'))} |")
    err = (st.get("eval", {}).get("summary") or {}).get("sft_tasks_error")
    if not (table and table.get("tasks")) and err:
        lines += ["", f"No before/after table: scoring the tasks through the chat template failed ({err}; see run.log)."]
    sft_ev = ev.get("sft")
    if sft_ev:
        d = sft_ev["bits_per_byte"] - ev["bits_per_byte"]
        lines += ["", f"What SFT costs on plain text (test split, bits per byte): base **{ev['bits_per_byte']:.4f}**, "
                      f"SFT **{sft_ev['bits_per_byte']:.4f}** ({d:+.4f}); validation {ev['val']['bits_per_byte']:.4f} "
                      f"and {sft_ev['val']['bits_per_byte']:.4f}."]
    if chat and chat.get("messages"):
        lines += ["", "### Chat transcript (the SFT model, greedy)", "", "```"]
        for m in chat["messages"]:
            lines.append(f"{m['role']}: {m['content']}")
        lines.append("```")
    return lines


def _pairs_stats(run_dir: Path, stages: dict) -> dict | None:
    """``dpo_pairs/stats.json`` when this run's dpo stage used the pairs (its pairs file is in its outputs)."""
    p = run_dir / "dpo_pairs" / "stats.json"
    outs = stages.get("dpo", {}).get("outputs") or {}
    if not p.exists() or not any(str(run_dir / "dpo_pairs") in k for k in outs):
        return None
    return json.loads(p.read_text())


def dpo_markdown(st: dict, table: dict | None, ev: dict, pairs: dict | None, recipe) -> list[str]:
    """The preference section: the pairs' yield, training and held-out pairs, SFT vs DPO, bits per byte."""
    s = st.get("dpo", {}).get("summary") or {}
    d = recipe.dpo
    what = f"{d.method}" + (f" (loss {' + '.join(d.loss_type)}, beta {d.beta:g})" if d.method == "dpo" else f" (beta {d.beta:g})")
    lines = ["", "## Preference optimization (DPO)", "",
             f"{what} on the SFT model, reference {d.reference!r}"
             + (f", LoRA rank {d.lora_r}" if d.lora_r else ", full fine-tuning") + " (`dpo/`: the model, metrics.jsonl, "
             "loss.png, margins.png; docs/preference.md)."]
    if pairs and isinstance(pairs.get("tasks"), dict):
        args = pairs.get("args") or {}
        lines += ["", "### Pairs the SFT model made (dev split)", "",
                  f"For each dev prompt {args.get('k', '?')} sampled answers (temperature {args.get('temperature', 1.0)}), "
                  "scored by the task's checker; a prompt with a correct and an incorrect answer gives a pair "
                  f"(`dpo_pairs/`, made in {pairs.get('seconds', '-')} s).", "",
                  "| task | prompts | answers | correct | pairs | yield | all correct | all wrong |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        tot = {k: 0 for k in ("prompts", "samples", "correct", "pairs", "all_correct", "all_wrong")}
        for name, t in pairs["tasks"].items():
            if not isinstance(t, dict):
                continue
            for k in tot:
                tot[k] += t.get(k) or 0
            y = f"{t['pairs'] / t['prompts']:.2f}" if t.get("prompts") else "-"
            lines.append(f"| {name} | {t.get('prompts', '-')} | {t.get('samples', '-')} | {t.get('correct', '-')} | "
                         f"{t.get('pairs', '-')} | {y} | {t.get('all_correct', '-')} | {t.get('all_wrong', '-')} |")
        y = f"{tot['pairs'] / tot['prompts']:.2f}" if tot["prompts"] else "-"
        lines.append(f"| all | {tot['prompts']} | {tot['samples']} | {tot['correct']} | {tot['pairs']} | {y} | "
                     f"{tot['all_correct']} | {tot['all_wrong']} |")
    if s:
        train = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items()
                          if k not in ("val_margin", "val_accuracy", "val_chosen", "val_rejected", "method", "loss_type"))
        lines += ["", f"Training: {train}."]
        if s.get("val_margin") is not None or s.get("val_accuracy") is not None:
            parts = []
            if s.get("val_margin") is not None:
                parts.append(f"reward margin **{s['val_margin']:.4f}**")
            if s.get("val_accuracy") is not None:
                parts.append(f"accuracy **{s['val_accuracy']:.3f}**")
            if s.get("val_chosen") is not None and s.get("val_rejected") is not None:
                parts.append(f"rewards chosen {s['val_chosen']:.4f}, rejected {s['val_rejected']:.4f}")
            lines += ["", "Held-out pairs (the prompts kept out of training, `val_frac`): " + ", ".join(parts)
                      + " (implicit reward: beta times the log-ratio of policy to reference; an accuracy of 0.5 and a "
                        "margin of 0 are chance)."]
    rows = (table or {}).get("tasks") or {}
    if rows and any("dpo_chat" in r for r in rows.values()):
        trained = set(table.get("dpo_trained") or [])
        lines += ["", "### SFT vs DPO", "",
                  "The synthetic tasks [sft] trained, on the private split (never trained on, never tuned on; 95% "
                  "bootstrap intervals), both models zero-shot through the chat template (`eval-sft/`, `eval-dpo/`); "
                  "DPO made pairs for the tasks marked *.", "",
                  "| task | metric | n | SFT, chat 0-shot | DPO, chat 0-shot | change |", "| --- | --- | --- | --- | --- | --- |"]
        for name, r in rows.items():
            a, b = r.get("sft_chat"), r.get("dpo_chat")
            c = a or b or {}
            delta = f"{b['value'] - a['value']:+.3f}" if a and b and None not in (a.get("value"), b.get("value")) else "-"
            lines.append(f"| {name}{' *' if name in trained else ''} | {c.get('metric', '-')} | {c.get('n', '-')} "
                         f"| {_cell(a)} | {_cell(b)} | {delta} |")
    if ev.get("dpo") and ev.get("sft"):
        a, b = ev["sft"], ev["dpo"]
        lines += ["", f"Plain text (test split, bits per byte): SFT **{a['bits_per_byte']:.4f}**, DPO "
                      f"**{b['bits_per_byte']:.4f}** ({b['bits_per_byte'] - a['bits_per_byte']:+.4f}); validation "
                      f"{a['val']['bits_per_byte']:.4f} and {b['val']['bits_per_byte']:.4f}."]
    return lines


def _mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:.3f} MB"


def quant_label(c: dict) -> str:
    """``rtn int8 g32 sym``, ``gptq int4 g32 asym act-order``, ``fp8 e4m3 channel w+a``: a QuantConfig in words."""
    m = c.get("method", "?")
    if m == "fp8":
        return f"fp8 {c.get('fp8_format')} {c.get('fp8_scale')}" + (" w+a" if c.get("activations") else " weight-only")
    if m == "llm_int8":
        return f"llm_int8 int8 threshold {c.get('threshold')}"
    if m == "smoothquant":
        return f"smoothquant w8a8 alpha {c.get('alpha')}"
    g = {"tensor": "tensor", "channel": "channel"}.get(c.get("granularity"), f"g{c.get('group_size')}")
    extra = " act-order" if m == "gptq" and c.get("act_order") else ""
    return f"{m} int{c.get('bits')} {g} {'sym' if c.get('sym', True) else 'asym'}{extra}"


def quant_markdown(q: dict, run_dir: Path) -> list[str]:
    """The quantization section: fp32 vs quantized, the GGUF, how to run it in llama.cpp."""
    c, f, z, g, d = q["config"], q["fp32"], q["quantized"], q.get("gguf"), q.get("decode") or {}

    def fast(r):
        return "yes" if r.get("fast_decode") else f"no ({r.get('fast_decode_why_not', '?')})"

    calib = c.get("method") in ("gptq", "awq", "smoothquant")
    lines = ["", "## Quantization", "",
             f"The {q['source'].upper() if q['source'] != 'model' else 'pretrained'} model quantized with "
             f"`{quant_label(c)}` (`lmforge quantize`, [quantize]"
             + (f"; calibration: {c.get('calib_samples')} windows of {c.get('calib_seq_len')} tokens from the train "
                "split" if calib else "") + f") in {q.get('quantize_s', '-')} s: `quantized/` "
             "(`lmforge generate --checkpoint` loads it). Test split bits per byte (the eval stage's code), the "
             "weights' bytes (every tensor of the state dict, and model.safetensors on disk), and greedy decode "
             f"through the engine ({d.get('max_tokens', '-')} tokens from {d.get('prompt', '')!r}, one run each, "
             f"{d.get('threads', '-')} threads).", "",
             "| model | test bits/byte | change | weights | model.safetensors | decode tok/s | C decode step |",
             "| --- | --- | --- | --- | --- | --- | --- |",
             f"| fp32 | {f['test_bpb']:.4f} | - | {_mb(f['weight_bytes'])} | {_mb(f['file_bytes'])} "
             f"| {f['decode_tok_s']:.0f} | {fast(f)} |",
             f"| {quant_label(c)} | {z['test_bpb']:.4f} | {z['test_bpb'] - f['test_bpb']:+.4f} | "
             f"{_mb(z['weight_bytes'])} ({z['weight_bytes'] / f['weight_bytes']:.2f}x) | {_mb(z['file_bytes'])} "
             f"| {z['decode_tok_s']:.0f} ({z['decode_tok_s'] / f['decode_tok_s']:.2f}x) | {fast(z)} |"]
    if g:
        lines.append(f"| GGUF {g['type']} (`{g['path']}`) | - | - | - | {_mb(g['bytes'])} (the .gguf) | - | - |")
    if not g and q.get("no_gguf"):
        lines += ["", f"No GGUF file: {q['no_gguf']}."]
    if d.get("same_greedy_prefix") is not None:
        lines += ["", f"The quantized model's greedy tokens equal the fp32 model's for the first "
                      f"{d['same_greedy_prefix']} of {min(f.get('decode_tokens', 0), z.get('decode_tokens', 0))}."]
    if g:
        path = run_dir / g["path"]
        lines += ["", f"### Run the GGUF in llama.cpp", "",
                  f"`{g['path']}` holds the same model's fp32 weights written as GGUF {g['type']} by lmforge's own "
                  "writer (every 2-D tensor in that type, the embeddings and the output head included, which "
                  "`quantized/` keeps in fp32; norms in f32); the tokenizer, its special tokens and the chat "
                  "template travel in the file.", "", "```bash",
                  f"llama-cli -m {path} -p {json.dumps(d.get('prompt') or 'ROMEO.')} -n 60 --temp 0",
                  f"python -c \"import llama_cpp; m = llama_cpp.Llama('{path}', verbose=False); "
                  f"print(m('ROMEO.', max_tokens=60, temperature=0)['choices'][0]['text'])\"", "```"]
    return lines


def write_report(run_dir: Path, recipe, manifest: dict, seconds: float) -> dict:
    st = manifest["stages"]
    ev = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").exists() else {}
    summary = {"run": str(run_dir), "recipe": recipe.name, "seconds": round(seconds, 1),
               "stage_seconds": {k: v.get("seconds") for k, v in st.items()},
               "split": ev.get("split", "val") if ev else None,  # which split bits_per_byte is on
               "bits_per_byte": ev.get("bits_per_byte"), "loss": ev.get("loss"),
               "perplexity": ev.get("perplexity"),
               "val_bits_per_byte": (ev.get("val") or {}).get("bits_per_byte"),
               "params": st.get("pretrain", {}).get("summary", {}).get("params"),
               "train_tokens": st.get("pretrain", {}).get("summary", {}).get("tokens"),
               "data_mb_per_s": None}
    tasks_res = _task_result(run_dir, st)
    core = ((tasks_res or {}).get("aggregate") or {}).get("core") or {}
    summary["core"] = core.get("value")
    lines = [f"# lmforge run `{run_dir.name}` (recipe `{recipe.name}`)", "",
             _headline(summary), "",
             *([f"Tasks: CORE (mean centered score over {len(core.get('tasks') or [])} tasks) "
                f"**{core['value']:.3f}**" + (f" [{core['ci'][0]:.3f}, {core['ci'][1]:.3f}]" if core.get("ci") else "")
                + " (the scorecard below; eval/ holds it with the per-sample logs)", ""]
               if core.get("value") is not None else []),
             "## Stages", "", "| stage | status | seconds | key numbers |", "| --- | --- | --- | --- |"]
    for name in recipe.stages:
        s = st.get(name, {})
        nums = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in (s.get("summary") or {}).items())
        lines.append(f"| {name} | {s.get('status', '-')} | {s.get('seconds', '-')} | {nums} |")
    data_report = run_dir / "data" / "report.json"
    if data_report.exists():
        from ..data.stats import collect, format_text

        ds = collect(run_dir / "data")
        tp = data_throughput(manifest, ds["input"]["bytes"])
        if tp is not None:  # the whole data stage, not only the call that made the shards
            ds["seconds"], ds["mb_per_s"] = tp["seconds"], tp["mb_per_s"]
            summary["data_mb_per_s"] = tp["mb_per_s"]
        lines += ["", "## Data", "", "```", format_text(ds), "```"]
        if tp is not None:
            lines += ["", "MB/s end to end: the input's bytes over the clean and shards stages' times together "
                          "(run.json); the tokenizer's training is timed in its own row."]
    png = run_dir / "model" / "loss.png"
    if png.exists():
        shutil.copyfile(png, run_dir / "loss.png")
        lines += ["", "## Loss", "", "![loss curves](loss.png)"]
    if ev:
        split = ev.get("split", "val")
        lines += ["", "## Evaluation", "",
                  f"{_SPLIT_NAMES[split]}: loss {ev['loss']:.4f} nats/token, perplexity {ev['perplexity']:.2f}, "
                  f"**{ev['bits_per_byte']:.4f} bits/byte** over {ev['bytes']:,} bytes of {ev['documents']} documents"]
        if ev.get("val"):
            v = ev["val"]
            lines += ["", f"{_SPLIT_NAMES['val']}: loss {v['loss']:.4f} nats/token, perplexity {v['perplexity']:.2f}, "
                          f"{v['bits_per_byte']:.4f} bits/byte over {v['bytes']:,} bytes of {v['documents']} documents"]
        lines += ["", "### Samples", ""]
        for smp in ev["samples"]:
            lines += ["```", smp["prompt"] + smp["completion"], "```"]
    if tasks_res is not None:
        from ..evaluate.report import scorecard_markdown

        png = run_dir / "eval" / "scorecard.png"
        lines += ["", scorecard_markdown(tasks_res, chart="eval/scorecard.png" if png.exists() else None,
                                         chart_note=None if png.exists() else "no chart (matplotlib not installed)",
                                         heading=2, base="eval/").rstrip()]
    sft_table = _stage_file(run_dir, st, "eval", "sft_eval.json")
    chat = _stage_file(run_dir, st, "demo", "chat.json")
    dpo = "dpo" in recipe.stages
    if "sft" in recipe.stages:
        lines += sft_markdown(st, sft_table, ev, None if dpo else chat)
        png = run_dir / "sft" / "loss.png"
        if png.exists():
            shutil.copyfile(png, run_dir / "sft_loss.png")
            lines += ["", "![SFT loss curves](sft_loss.png)"]
        if ev.get("sft"):
            summary["sft_bits_per_byte"] = ev["sft"]["bits_per_byte"]
        if sft_table:
            summary["sft_tasks"] = {n: {k: (c or {}).get("value") for k, c in r.items()}
                                    for n, r in sft_table["tasks"].items()}
    if dpo:
        lines += dpo_markdown(st, sft_table, ev, _pairs_stats(run_dir, st), recipe)
        for name, title in (("loss", "DPO loss curves"), ("margins", "DPO reward margin and accuracy")):
            png = run_dir / "dpo" / f"{name}.png"
            if png.exists():
                shutil.copyfile(png, run_dir / f"dpo_{name}.png")
                lines += ["", f"![{title}](dpo_{name}.png)"]
        if ev.get("dpo"):
            summary["dpo_bits_per_byte"] = ev["dpo"]["bits_per_byte"]
        s = st.get("dpo", {}).get("summary") or {}
        for k in ("val_margin", "val_accuracy"):
            if s.get(k) is not None:
                summary[f"dpo_{k}"] = s[k]
        if chat and chat.get("messages"):
            lines += ["", f"### Chat transcript (the {chat.get('model', 'DPO').upper()} model, greedy)", "", "```"]
            lines += [f"{m['role']}: {m['content']}" for m in chat["messages"]] + ["```"]
    quant = _stage_file(run_dir, st, "quantize", "quant.json") if "quantize" in recipe.stages else None
    if quant:
        lines += quant_markdown(quant, run_dir)
        summary.update(quant_method=quant_label(quant["config"]), quant_test_bpb=quant["quantized"]["test_bpb"],
                       quant_weight_bytes=quant["quantized"]["weight_bytes"],
                       quant_decode_tok_s=quant["quantized"]["decode_tok_s"],
                       fp32_decode_tok_s=quant["fp32"]["decode_tok_s"])
        if quant.get("gguf"):
            summary["gguf"] = quant["gguf"]["path"]
    demo = run_dir / "demo.json"
    if demo.exists():
        chatter = "DPO" if dpo else "SFT"
        lines += ["", "## Demo (engine" + (f", the base model on plain prompts; the {chatter} model chats above)"
                                         if "sft" in recipe.stages or dpo else ")"), ""]
        for d in json.loads(demo.read_text()):
            lines += ["```", d["prompt"] + d["completion"], "```"]
    lines += ["", "## Artifacts", "",
              "- `data/`: shards, manifest, filter and dedup report", "- `tokenizer/`: the tokenizer",
              "- `model/`: checkpoints, metrics.jsonl, the final model (`lmforge eval --checkpoint`)",
              *(["- `sft/`: the SFT run (checkpoints, metrics.jsonl) and its model (`lmforge chat --checkpoint`); "
                 "`eval-sft/`, `eval-base-chat/`: the chat-template scorecards; `sft_eval.json`: the before/after "
                 "table; `chat.json`: the transcript"] if "sft" in recipe.stages else []),
              *(["- `dpo/`: the preference run (checkpoints, metrics.jsonl with TRL's metric names, margins.png) and "
                 "its model; `dpo_pairs/`: the pairs the SFT model made (pairs.jsonl, unpaired.jsonl, stats.json); "
                 "`eval-dpo/`: its chat-template scorecard"] if dpo else []),
              "- `hf/`: the " + ("DPO model (with its chat template) " if dpo else
                                 "SFT model (with its chat template) " if "sft" in recipe.stages else "model ")
              + "for `transformers.AutoModelForCausalLM.from_pretrained`",
              *(["- `quantized/`: the quantized final model (`lmforge.quant.checkpoint.load_quantized`, `lmforge "
                 "generate --checkpoint`); `export/`: its fp32 weights as GGUF for llama.cpp; `quant.json`: the "
                 "fp32 vs quantized measurements"] if quant else []),
              "- `eval.json`: bits per byte and samples; `eval/`: the tasks' result.json, scorecard.md, chart "
              "and per-sample logs (`lmforge eval compare` takes it)",
              "- `run.json`: stages, hashes, times; `run.log`: the log; `recipe.json`: the recipe used"]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    write_json(run_dir / "summary.json", summary, indent=1)
    return summary
