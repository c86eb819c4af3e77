"""The ``lmforge eval`` subcommands: bits per byte of a checkpoint, tasks, compare, judge, the task list.

* ``lmforge eval --checkpoint DIR`` (no ``--tasks``): loss, perplexity and bits per byte on the
  run's validation (or ``--split test``) shards, other shards or a text file (``perplexity``).
* ``lmforge eval --tasks T1,T2|default|all --checkpoint DIR``: the tasks scored on the model
  (``local.LocalLM``, ``task.load_tasks``, ``harness.evaluate``), the report written
  (``report.write``: result.json, scorecard.md, scorecard.png, samples/), the scorecard printed
  (``--json``: the result object, one JSON object and nothing else on stdout).
* ``lmforge eval compare RUN_A RUN_B``: per task and metric B - A with an interval (``report.compare``).
* ``lmforge eval judge ...``: LLM-as-judge (``judge``'s own arguments and handler).
* ``lmforge eval tasks``: the built-in tasks, their output type, size and description.

Knows the arguments, their help, the defaults taken from a run (its data directory from the
train_config.json next to the checkpoint; the report beside the checkpoint when it is a
pipeline run's ``model/``) and how results are printed; knows nothing of how anything is
scored. A handler imports what it calls when it runs (``lmforge --help`` stays light).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from .._cli_common import _checkpoint
from .run import TASK_SPLITS, evaluate_checkpoint, run_data_dir, task_names

BPB_SPLITS = ("val", "test", "train")


def _usage(msg: str):
    from .._config import UsageError

    return UsageError(msg)


# ---------------------------------------------------------------- bits per byte (no --tasks)

def cmd_bpb(a) -> int:
    from ..model import load
    from .perplexity import evaluate_shards, evaluate_text

    for opt, val in (("--include-path", a.include_path), ("--limit", a.limit), ("--num-fewshot", a.num_fewshot),
                     ("--bootstrap", a.bootstrap), ("--seed", a.seed), ("--out", a.out),
                     ("--sandbox-workers", a.sandbox_workers)):
        if val is not None:
            raise _usage(f"{opt} is an option of task evaluation: give --tasks too (without --tasks, "
                         "lmforge eval measures bits per byte)")
    for opt, val in (("--decontaminate", a.decontaminate), ("--allow-network", a.allow_network),
                     ("--apply-chat-template", a.apply_chat_template)):
        if val:
            raise _usage(f"{opt} is an option of task evaluation: give --tasks too")
    split = a.split or "val"
    if split not in BPB_SPLITS:
        raise _usage(f"--split {split}: without --tasks (bits per byte) the splits are {', '.join(BPB_SPLITS)}; "
                     f"{', '.join(TASK_SPLITS)} are the splits of task evaluation (--tasks)")
    batch_size = a.batch_size or 8
    model, tok = load(a.checkpoint)
    if a.text:
        if tok is None:
            raise ValueError(f"{a.checkpoint}: no tokenizer in the checkpoint; cannot evaluate a text file")
        from ..model import load_tokens

        r = evaluate_text(model, tok, a.text, a.seq_len, batch_size=batch_size,
                          doc_token=load_tokens(a.checkpoint, tok).doc)
    else:
        data = a.data if a.data is not None else run_data_dir(a.checkpoint)
        if data is None:
            raise ValueError("give --text FILE or --data DIR (no training config next to the checkpoint)")
        r = evaluate_shards(model, data, split, a.seq_len, batch_size=batch_size, tokenizer=tok,
                            tokenizer_name=f"the tokenizer of {a.checkpoint}")
    if a.json:
        print(json.dumps(r))
    else:
        where = {"val": "validation split: ", "test": "test split: ", "train": "training split: "}.get(r.get("split"), "")
        print(f"{where}loss {r['loss']:.4f} nats/token, perplexity {r['perplexity']:.2f}, "
              f"{r['bits_per_byte']:.4f} bits/byte ({r['tokens']:,} tokens, {r['bytes']:,} bytes)")
    return 0


# ---------------------------------------------------------------- tasks

def cmd_tasks_eval(a) -> int:
    if a.text:
        raise _usage("--text is for bits per byte of a text file; with --tasks the documents come from the tasks")
    if a.seq_len is not None:
        raise _usage("--seq-len is for bits per byte; with --tasks the model's own context length is used")
    split = a.split or "test"
    if split not in TASK_SPLITS:
        raise _usage(f"--split {split}: with --tasks the splits are test (each task's test split: private for the "
                     f"built-ins), dev (its public dev split) or both (and their gap); {', '.join(BPB_SPLITS)} are "
                     "bits per byte's (without --tasks)")
    for opt, v in (("--limit", a.limit), ("--num-fewshot", a.num_fewshot), ("--bootstrap", a.bootstrap),
                   ("--batch-size", a.batch_size), ("--sandbox-workers", a.sandbox_workers)):
        positive = opt in ("--limit", "--batch-size", "--sandbox-workers")
        if v is not None and v < (1 if positive else 0):
            raise _usage(f"{opt} {v}: expected {'a positive' if positive else 'a non-negative'}"
                         " integer")
    if a.include_path is not None and not Path(a.include_path).is_dir():
        raise FileNotFoundError(f"--include-path {a.include_path}: not a directory (of task files)")
    names = task_names(a.tasks, a.include_path)
    from . import report

    # with --json, stdout carries the result object alone: whatever else is printed goes to stderr
    quiet = contextlib.redirect_stdout(sys.stderr) if a.json else contextlib.nullcontext()
    with quiet:
        result, paths = evaluate_checkpoint(
            a.checkpoint, names, include_path=a.include_path, limit=a.limit, num_fewshot=a.num_fewshot,
            split=split, bootstrap=1000 if a.bootstrap is None else a.bootstrap, seed=a.seed or 0, data_dir=a.data,
            decontaminate=a.decontaminate, out=a.out, batch_size=a.batch_size, progress=not a.json,
            allow_network=a.allow_network, sandbox_workers=2 if a.sandbox_workers is None else a.sandbox_workers,
            apply_chat_template=a.apply_chat_template)
    if a.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(report.scorecard_text(result), end="")
    print(f"report: {paths['scorecard']} (result: {paths['result']})", file=sys.stderr)
    return 0


def cmd_eval(a) -> int:
    if a.checkpoint is None:
        raise _usage("lmforge eval: give --checkpoint DIR (with --tasks: the tasks to score; without: bits per "
                     "byte), or a subcommand: compare, judge, tasks, lm-eval (`lmforge eval --help`)")
    _checkpoint(a.checkpoint)
    return cmd_tasks_eval(a) if a.tasks is not None else cmd_bpb(a)


# ---------------------------------------------------------------- compare / tasks

def cmd_compare(a) -> int:
    from . import report

    c = report.compare(a.run_a, a.run_b, bootstrap=a.bootstrap, seed=a.seed)
    if a.out:
        from .._io import atomic_open

        with atomic_open(a.out) as f:
            f.write(report.compare_markdown(c))
    if a.json:
        print(json.dumps(c, ensure_ascii=False))
    else:
        print(report.compare_text(c), end="")
    return 0


def task_list(include_path=None) -> list[dict]:
    """The built-in tasks (and those in ``include_path``): name, output type, documents per split (for a
    built-in generator: its default, or the definition's ``n``), metrics, whether it needs a run's corpus
    (``--data``), and a description (the definition file's leading comment lines)."""
    from . import builtin
    from .task import load_task, load_tasks

    rows = [_task_row(t, "built-in") for t in (load_tasks(builtin.names()) if builtin.names() else [])]
    if include_path:
        rows += [_task_row(t, str(include_path)) for t in load_task(include_path)]
    return rows


def _leading_comment(path) -> str:
    lines = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, TypeError):
        return ""
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(x for x in lines if x)


def _task_row(t, source: str) -> dict:
    from . import builtin

    cfg = t.config if isinstance(getattr(t, "config", None), dict) else {}
    gen = cfg.get("generator")
    n = (cfg.get("generator_kwargs") or {}).get("n")
    if n is None and gen in builtin.GENERATORS:
        n = builtin.default_n(gen)
    return {"task": t.name, "output_type": t.output_type, "n": n, "metrics": [m for m, _ in t.metrics],
            "primary": t.primary_metric, "random_baseline": t.random_baseline, "generator": gen,
            "needs_data": gen in builtin.CORPUS, "source": source,
            "description": _leading_comment(getattr(t, "source", "")) or str(cfg.get("description") or "").strip()}


def cmd_list_tasks(a) -> int:
    if a.include_path is not None and not Path(a.include_path).is_dir():
        raise FileNotFoundError(f"--include-path {a.include_path}: not a directory (of task files)")
    rows = task_list(a.include_path)
    if a.json:
        print(json.dumps(rows, ensure_ascii=False))
        return 0
    from . import builtin

    default = set(builtin.DEFAULT_TASKS)
    cells = [["task", "output type", "n", "primary", "description"]]
    for r in rows:
        name = r["task"] + (" *" if r["task"] in default and r["source"] == "built-in" else "")
        if r["needs_data"]:
            name += " (corpus)"
        cells.append([name, str(r["output_type"]), "-" if r["n"] is None else str(r["n"]), str(r["primary"]),
                      r["description"]])
    w = [max(len(c[i]) for c in cells) for i in range(4)]
    for i, c in enumerate(cells):
        print("  ".join(v.ljust(w[j]) for j, v in enumerate(c[:4])) + "  " + c[4])
        if i == 0:
            print("  ".join("-" * x for x in w) + "  " + "-" * 11)
    if not rows:
        print("(no tasks)")
    print("\n* the default set (`--tasks default`, the pipeline's eval stage); (corpus): documents from the test "
          "split of a run's data (--data); n: documents per split")
    return 0


# ---------------------------------------------------------------- the parser

_DESCRIPTION = """\
Evaluate a model directory (lmforge or HF).

Without --tasks: loss (nats/token), perplexity and tokenizer-independent bits per byte on the run's
validation shards (or --split test, other shards with --data, or a text file with --text).

With --tasks: score tasks the way lm-evaluation-harness does (multiple choice by log-likelihood,
rolling log-likelihood, generation until a stop; pass@k in a sandbox), each score with a 95%
bootstrap interval, and write result.json, scorecard.md, scorecard.png and per-sample logs
(samples/<task>.jsonl) into --out. The built-in tasks have a public dev split and a private test
split drawn from a seed made on this machine (never committed): --split test reports the private
one, --split both adds the dev score and the private-minus-dev gap."""

_EPILOG = """\
examples:
  lmforge eval --checkpoint runs/default/model --json              bits per byte (validation)
  lmforge eval --checkpoint runs/default/model --tasks default     the default task set
  lmforge eval --checkpoint runs/default/model --tasks addition,next_line --split both --decontaminate
  lmforge eval --checkpoint DIR --tasks my_task --include-path my_tasks/ --limit 50
  lmforge eval compare runs/a/eval runs/b/eval                     B - A per task, with intervals
  lmforge eval tasks                                               the built-in tasks
  lmforge eval SUBCOMMAND --help                                   a subcommand's options"""

_USAGE = """lmforge eval --checkpoint DIR [--tasks T1,T2|default|all] [options]
       lmforge eval {compare,judge,tasks,lm-eval} ..."""


def add_parser(sub) -> None:
    ev = sub.add_parser("eval", help="bits per byte, or tasks (--tasks) with a scorecard; compare, judge, tasks",
                        usage=_USAGE, description=_DESCRIPTION, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("--checkpoint", default=None, metavar="DIR", help="a model directory (lmforge or HF)")
    g = ev.add_argument_group("tasks (with --tasks)")
    g.add_argument("--tasks", default=None, metavar="T1,T2|default|all",
                   help="task names (built-in, in --include-path) or task files, comma-separated; default: the "
                   "default set; all: every built-in task (and every one in --include-path)")
    g.add_argument("--include-path", default=None, metavar="DIR", help="a directory of task definitions (lmforge "
                   "YAML/JSONL or lm-eval YAML; searched before the built-in tasks)")
    g.add_argument("--limit", type=int, default=None, metavar="N", help="score only the first N documents of each task")
    g.add_argument("--num-fewshot", type=int, default=None, metavar="K", help="few-shot examples (default: each task's)")
    g.add_argument("--bootstrap", type=int, default=None, metavar="N", help="bootstrap resamples for the 95%% intervals "
                   "(default 1000; 0: none)")
    g.add_argument("--seed", type=int, default=None, metavar="S", help="seed of few-shot draws, sampling and the "
                   "bootstrap (default 0)")
    g.add_argument("--decontaminate", action="store_true", help="count each task's documents that share a 13-gram "
                   "with the run's training shards (--data) and score the clean subset too")
    g.add_argument("--sandbox-workers", type=int, default=None, metavar="N", help="pass@k programs run at once "
                   "in the sandbox (default 2)")
    g.add_argument("--apply-chat-template", action="store_true", help="render every prompt as one user turn of "
                   "the model's chat template, the assistant's turn opened (lm-eval's --apply_chat_template; "
                   "for an SFT model, usually with --num-fewshot 0)")
    g.add_argument("--allow-network", action="store_true", help="run pass@k programs even where the sandbox cannot "
                   "give them a network namespace and a read-only filesystem (limits and a throwaway directory "
                   "only); without it such a machine refuses")
    g.add_argument("--out", default=None, metavar="DIR", help="where the report goes (default: <run>/eval for a "
                   "pipeline run's model/, else ./eval-<checkpoint name>)")
    b = ev.add_argument_group("bits per byte (without --tasks)")
    b.add_argument("--text", default=None, metavar="FILE", help="a UTF-8 text file (instead of the run's shards)")
    b.add_argument("--seq-len", type=int, default=None, metavar="N", help="tokens per window (default: the model's)")
    c = ev.add_argument_group("both")
    c.add_argument("--data", default=None, metavar="DIR", help="the run's shards directory (default: the one in "
                   "train_config.json next to the checkpoint); bits per byte is measured on it, corpus tasks draw "
                   "their documents from its test split, --decontaminate checks against its training split")
    c.add_argument("--split", default=None, choices=sorted(set(TASK_SPLITS + BPB_SPLITS)),
                   help="with --tasks: test (default; each task's test split, private for the built-ins), dev or "
                   "both. Without: val (validation, default: for choosing settings), test (for reporting; a "
                   "directory prepared before the test split existed has none) or train")
    c.add_argument("--batch-size", type=int, default=None, metavar="N", help="sequences per forward (bits per byte: default 8; "
                   "tasks: the model's own choice)")
    c.add_argument("--json", action="store_true", help="print one JSON object (and nothing else on stdout)")
    ev.set_defaults(fn=cmd_eval)

    cmds = ev.add_subparsers(dest="eval_cmd", metavar="SUBCOMMAND", title="subcommands", prog="lmforge eval")
    cmds.required = False
    cp = cmds.add_parser("compare", help="per-task differences between two results, with intervals",
                         description="B - A for every task and metric the two results share, with a 95% interval: "
                         "a paired bootstrap over the documents both scored (same doc_id and prompt) when both "
                         "have per-sample logs and the score is a mean of per-document values; otherwise an "
                         "unpaired normal interval from the two standard errors (labelled so). 'excludes 0' "
                         "says whether the difference is more than noise at 95%.")
    cp.add_argument("run_a", metavar="RUN_A", help="a result directory (written by lmforge eval --tasks) or its result.json")
    cp.add_argument("run_b", metavar="RUN_B", help="the other one")
    cp.add_argument("--bootstrap", type=int, default=2000, metavar="N", help="resamples (default 2000)")
    cp.add_argument("--seed", type=int, default=0, metavar="S")
    cp.add_argument("--out", default=None, metavar="FILE.md", help="also write the comparison as markdown")
    cp.add_argument("--json", action="store_true", help="print one JSON object")
    cp.set_defaults(fn=cmd_compare)

    ts = cmds.add_parser("tasks", help="list the built-in tasks",
                         description="The built-in tasks: output type, documents per split, metrics, description "
                         "(* = in the default set).")
    ts.add_argument("--include-path", default=None, metavar="DIR", help="list the tasks defined there too")
    ts.add_argument("--json", action="store_true", help="print one JSON array")
    ts.set_defaults(fn=cmd_list_tasks)

    _add_judge(cmds)

    le = cmds.add_parser("lm-eval", help="lm-evaluation-harness's own CLI with the lmforge model registered",
                         description="Run lm-eval's CLI unchanged, with lmforge registered as a model: `lmforge eval "
                         "lm-eval -- --model lmforge --model_args checkpoint=DIR --tasks TASK [--include_path DIR] "
                         "...` (every argument after -- is lm-eval's). Needs lm-eval installed.")
    le.add_argument("lm_eval_args", nargs=argparse.REMAINDER, metavar="-- ARGS", help="lm-eval's arguments")
    le.set_defaults(fn=cmd_lm_eval)


def cmd_lm_eval(a) -> int:
    args = list(a.lm_eval_args)
    if args[:1] == ["--"]:
        args = args[1:]
    try:
        from .lm_eval_adapter import run_cli
    except ImportError as e:
        raise RuntimeError(f"lmforge eval lm-eval needs lm-evaluation-harness (pip install lm_eval): {e}") from None
    return run_cli(args)


def _add_judge(cmds) -> None:
    help_ = "LLM-as-judge: pairwise with position swap, rubric grading, agreement with ground truth"
    try:
        from . import judge
    except ImportError as e:  # (the judge module is absent from this build)
        jp = cmds.add_parser("judge", help=help_, description=help_)
        reason = str(e)

        def missing(a, reason=reason):
            raise RuntimeError(f"lmforge eval judge is unavailable: {reason}")
        jp.set_defaults(fn=missing)
        return
    jp = cmds.add_parser("judge", help=help_, description=(judge.__doc__ or help_).strip().split("\n\n")[0],
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    judge.add_arguments(jp)
    jp.set_defaults(fn=judge.cmd)
