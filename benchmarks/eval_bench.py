"""Evaluation throughput: lmforge's ``LocalLM`` against lm-eval's ``hf`` backend (``HFLM``), same model, same requests.

The model is a run's lmforge checkpoint (``RUN/model``) and its HF export (``RUN/hf``): the same weights.
Requests are built from the run's test split (``RUN/data/test-*.bin``, decoded with the model's tokenizer):

* multiple choice: passages of a few lines as the context, four choices (the true next line and three
  other lines of the same play), scored with ``loglikelihood``;
* generation: passages as prompts, ``max_gen_toks`` 32, ``until`` ["\\n\\n"], greedy.

Both sides get the same ``torch.set_num_threads``, a warm-up, and each its best batch size among a few
tried (printed); a time is the median of 3 runs. Parity is checked and printed: the largest absolute
difference of the two sides' log-likelihoods, is_greedy agreement and how many greedy generations match.

    PYTHONPATH=src python benchmarks/eval_bench.py [RUN_DIR] [--quick] [--threads N] [--ablate] [--only mc|gen]

Ends with the house's JSON line: {"benchmark": "eval", "rows": [...]} (requests/s, goal 3x).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import report, row  # noqa: E402

DEFAULT_RUN = str(Path(__file__).resolve().parent.parent / "runs" / "default")  # `make demo` writes it


def fail(msg: str) -> None:
    print(f"eval_bench: {msg}", file=sys.stderr)
    raise SystemExit(2)


def check_run(run: Path) -> None:
    need = [run / "model" / "config.json", run / "hf" / "config.json", run / "data" / "manifest.json"]
    missing = [str(p) for p in need if not p.exists()]
    if missing:
        fail(f"{run} is not a finished demo run (missing {', '.join(missing)}). Make one with `make demo` "
             f"(it writes runs/default with model/, hf/ and data/), or pass another run directory.")


def test_texts(run: Path, tok) -> list[str]:
    """The documents of the run's test split, decoded."""
    import numpy as np

    man = json.loads((run / "data" / "manifest.json").read_text())
    split = man.get("splits", {}).get("test")
    if not split or not split.get("shards"):
        fail(f"{run / 'data' / 'manifest.json'}: no test split")
    docs = []
    for sh in split["shards"]:
        arr = np.fromfile(run / "data" / sh["file"], dtype=man.get("dtype", "uint16"))
        idx = json.loads((run / "data" / sh["index"]).read_text())
        starts = list(idx["starts"]) + [len(arr)]
        for a, b in zip(starts, starts[1:]):
            ids = [int(t) for t in arr[a:b] if int(t) not in tok.special_tokens.values()]
            docs.append(tok.decode(ids))
    return docs


def build_requests(docs: list[str], n_mc: int, n_gen: int, seed: int = 0):
    rng = random.Random(seed)
    plays = [[l for l in d.splitlines() if l.strip()] for d in docs]
    plays = [p for p in plays if len(p) > 40]
    mc, gen = [], []
    for q in range(n_mc):
        lines = plays[q % len(plays)]
        i = rng.randrange(6, len(lines) - 1)
        k = rng.randint(3, 6)
        ctx = "\n".join(lines[i - k:i])[-400:] + "\n"
        others = rng.sample([j for j in range(len(lines)) if j != i], 3)
        for j in [i] + others:
            mc.append((ctx, lines[j]))
    for q in range(n_gen):
        lines = plays[q % len(plays)]
        i = rng.randrange(4, len(lines))
        gen.append(("\n".join(lines[i - rng.randint(2, 4):i])[-300:] + "\n", {"until": ["\n\n"], "max_gen_toks": 32}))
    return mc, gen


def timed(fn, runs: int) -> tuple[float, object]:
    ts, out = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def best_of(name: str, settings: list, make_fn, n: int, runs: int, warm) -> tuple[float, object, object]:
    """(requests/s, setting, output) of the best setting; each warmed up, then timed (median of ``runs``)."""
    best = None
    for s in settings:
        fn = make_fn(s)
        warm(s)
        t, out = timed(fn, runs)
        rate = n / t
        print(f"  {name:<8} {str(s):>14}: {rate:9.1f} requests/s ({t:.2f} s)", flush=True)
        if best is None or rate > best[0]:
            best = (rate, s, out)
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", nargs="?", default=DEFAULT_RUN, help=f"a run directory (default {DEFAULT_RUN})")
    ap.add_argument("--quick", action="store_true", help="fewer requests, settings and runs (about a minute)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's)")
    ap.add_argument("--mc", type=int, default=None, help="multiple-choice questions (4 choices each; default 200)")
    ap.add_argument("--gen", type=int, default=None, help="generation prompts (default 64)")
    ap.add_argument("--ablate", action="store_true", help="also time LocalLM with each technique switched off")
    ap.add_argument("--only", choices=("mc", "gen"), default=None,
                    help="time only the multiple-choice (mc) or only the generation (gen) requests")
    args = ap.parse_args(argv)
    run = Path(args.run)
    check_run(run)

    import torch

    try:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        fail(f"lm-eval is needed for the reference side ({e}); pip install lm_eval")
    from lmforge.evaluate.local import LocalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    runs = 1 if args.quick else 3
    n_mc = args.mc or (40 if args.quick else 200)
    n_gen = args.gen or (12 if args.quick else 64)

    ours = LocalLM.from_checkpoint(run / "model")
    # LocalLM starts every context with the document token; add_bos_token makes HFLM start them with BOS (the
    # same id in an lmforge export) even when the export's tokenizer.json has no BOS post-processor
    ref = HFLM(pretrained=str(run / "hf"), device="cpu", dtype="float32", batch_size=1, add_bos_token=True)
    if ref.prefix_token_id != ours.doc:
        print(f"note: lm-eval's prefix token {ref.prefix_token_id} is not lmforge's document token {ours.doc}: "
              "log-likelihoods will differ")
    # lmforge stops at every stop id of the model's TokenSpec (the document token included: a new document
    # starts); an export whose generation_config names fewer gets them here, so both sides stop alike
    gc = ref.model.generation_config
    eos = gc.eos_token_id if isinstance(gc.eos_token_id, list) else [gc.eos_token_id] if gc.eos_token_id is not None else []
    if set(eos) != set(ours.tokens.stop):
        print(f"note: the HF export stops at {eos}, lmforge at {ours.tokens.stop}: lm-eval's generate is given "
              f"lmforge's stop ids")
        gc.eos_token_id = list(ours.tokens.stop)
    mc, gen = build_requests(test_texts(run, ours.tokenizer), n_mc, n_gen)
    print(f"model {run / 'model'} ({sum(p.numel() for p in ours.model.parameters()):,} parameters) and {run / 'hf'}; "
          f"{len(mc)} multiple-choice requests ({n_mc} x 4), {len(gen)} generation prompts; {threads} threads; "
          f"median of {runs}")

    def inst(kind, args_list):
        return [Instance(kind, {}, a, i) for i, a in enumerate(args_list)]


    def hf_set(b):
        ref.batch_size_per_gpu = b

    def our_set(s):
        ours.batch_size, ours.token_budget = s if isinstance(s, tuple) else (None, s)

    ref_bs = [16, 64] if args.quick else [8, 32, 64, 128]
    our_budgets = [16384] if args.quick else [4096, 8192, 16384]
    rows = []
    diff = same = None

    if args.only != "gen":
        diff = _bench_mc(args, ours, ref, mc, inst, hf_set, our_set, ref_bs, our_budgets, runs, rows)
    if args.only != "mc":
        same = _bench_gen(args, ours, ref, gen, inst, hf_set, runs, rows)
    note = [f"threads {threads}"]
    if diff is not None:
        note.append(f"log-likelihood max |diff| {diff:.2e}")
    if same is not None:
        note.append(f"generations equal {same}/{len(gen)}")
    report("eval", rows, note="; ".join(note))


def _bench_mc(args, ours, ref, mc, inst, hf_set, our_set, ref_bs, our_budgets, runs, rows):
    """loglikelihood (multiple choice): both sides at their best setting, then the ablations; the largest |diff|."""
    mc_inst = inst("loglikelihood", mc)
    print("loglikelihood (multiple choice):")
    warm_mc = mc[:16]
    r_rate, r_bs, r_out = best_of("lm-eval", ref_bs, lambda b: (hf_set(b), lambda: ref.loglikelihood(
        mc_inst, disable_tqdm=True))[1], len(mc), runs,
        lambda b: (hf_set(b), ref.loglikelihood(inst("loglikelihood", warm_mc), disable_tqdm=True)))
    o_rate, o_bs, o_out = best_of("lmforge", our_budgets, lambda s: (our_set(s), lambda: ours.loglikelihood(mc))[1],
                                  len(mc), runs, lambda s: (our_set(s), ours.loglikelihood(warm_mc)))
    diff = max(abs(a[0] - b[0]) for a, b in zip(o_out, r_out))
    greedy_agree = sum(a[1] == b[1] for a, b in zip(o_out, r_out))
    print(f"  best: lm-eval batch_size {r_bs}, lmforge token_budget {o_bs}; log-likelihoods max |diff| {diff:.2e}; "
          f"is_greedy agrees on {greedy_agree}/{len(mc)}")
    rows.append(row("loglikelihood (multiple choice)", o_rate, r_rate, "requests/s", goal=3.0))
    if args.ablate:  # each technique switched off in turn, at the best token budget
        our_set(o_bs)
        for name, attr, off in (("no shared contexts (a row per request)", "share_contexts", False),
                                ("head and log-softmax everywhere", "head_only", False),
                                ("no length buckets (pad_slack 1)", "pad_slack", 1.0)):
            was = getattr(ours, attr)
            setattr(ours, attr, off)
            ours.loglikelihood(warm_mc)
            t, _ = timed(lambda: ours.loglikelihood(mc), runs)
            setattr(ours, attr, was)
            print(f"  lmforge without: {name}: {len(mc) / t:.1f} requests/s")
            rows.append(row(f"ablation: {name}", len(mc) / t, r_rate, "requests/s"))
    return diff


def _bench_gen(args, ours, ref, gen, inst, hf_set, runs, rows):
    """generate_until (greedy): both sides at their best setting; how many generations are equal."""
    gen_inst = inst("generate_until", gen)
    print("generate_until (greedy, 32 tokens, until \\n\\n):")
    gen_bs = [16, 64] if args.quick else [8, 16, 32, 64]
    warm_gen = gen[:4]
    r_rate, r_bs, r_gen = best_of("lm-eval", gen_bs, lambda b: (hf_set(b), lambda: ref.generate_until(
        gen_inst, disable_tqdm=True))[1], len(gen), runs,
        lambda b: (hf_set(b), ref.generate_until(inst("generate_until", warm_gen), disable_tqdm=True)))
    ours._engine = None

    def our_gen(b):
        ours.batch_size, ours._engine = b, None

    def our_gen_run():  # a fresh engine each run: no prefix blocks cached by the run before (its build is timed)
        ours._engine = None
        return ours.generate_until(gen)

    o_rate, o_bs, o_gen = best_of("lmforge", [64] if args.quick else [16, 64],
                                  lambda b: (our_gen(b), our_gen_run)[1], len(gen), runs,
                                  lambda b: (our_gen(b), ours.generate_until(warm_gen)))
    same = sum(a == b for a, b in zip(o_gen, r_gen))
    print(f"  best: lm-eval batch_size {r_bs}, lmforge {o_bs} in flight; greedy generations equal: {same}/{len(gen)}")
    for k, (a, b) in enumerate(zip(o_gen, r_gen)):
        if a != b:
            print(f"    first difference, prompt {k}: lmforge {a!r:.80} vs lm-eval {b!r:.80}")
            break
    rows.append(row("generate_until (greedy)", o_rate, r_rate, "requests/s", goal=3.0))
    return same


if __name__ == "__main__":
    main()
