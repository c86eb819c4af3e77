"""lm-evaluation-harness both ways, on the local tasks in lm-eval's own YAML (tests/data/lm_eval_tasks/):
lm-eval driving an lmforge model through the adapter (``lm_eval_adapter``), lm-eval's ``hf`` backend on the
HF export of the same model, and lmforge's own loader and harness reading the same YAML, all give the same
per-sample answers and the same scores.

The model is tiny and random (moved off its init so that its answers depend on the prompt); its tokenizer has
lmforge's special tokens, so the document token is ``<|bos|>`` and the HF export's tokenizer prepends it
(``add_bos_token`` true, a ``TemplateProcessing`` post-processor). lm-eval's ``hf`` backend reads that as its
BOS: with its default model_args its contexts for ``loglikelihood`` and ``generate_until`` are the ids the
adapter scores (``[<|bos|>] + encode(context)``), but its ``loglikelihood_rolling`` prepends the prefix token
to ids that already start with BOS (scoring ``<|bos|>`` after ``<|bos|>``); with ``add_bos_token=False`` its
rolling windows are lmforge's (prefix ``<|bos|>``, then the text) and its contexts lose the BOS. So the hf
side runs the rolling task with ``add_bos_token=False`` and the others with the defaults.

lm-eval resolves ``data_files`` against the working directory (lmforge's loader against the YAML's folder),
so every lm-eval run here works in the tasks folder.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import in_ci, perturbed

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

TASKS = Path(__file__).parent / "data" / "lm_eval_tasks"
NAMES = ["lmf_choice", "lmf_rolling", "lmf_generate"]
FEWSHOT = ["lmf_choice_fewshot", "lmf_generate_fewshot"]  # include:, a train split, description, gen_prefix
ALL = NAMES + FEWSHOT
SRC = Path(__file__).resolve().parents[1] / "src"
# lm-eval's result keys of each task's metrics
METRICS = {"lmf_choice": ["acc,none", "acc_norm,none"],
           "lmf_rolling": ["word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"],
           "lmf_generate": ["exact_match,none"]}
METRICS.update({"lmf_choice_fewshot": METRICS["lmf_choice"], "lmf_generate_fewshot": METRICS["lmf_generate"]})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(lmforge model dir, HF export dir) of a tiny random llama-family model with lmforge's special tokens."""
    from lmforge import tokenize
    from lmforge.data import corpus_files
    from lmforge.model import make_config, save
    from lmforge.model.hf import export_hf
    from lmforge.model.transformer import Transformer
    from lmforge.tokenize.special import default_special_tokens

    d = tmp_path_factory.mktemp("lm_eval_model")
    text = corpus_files("shakespeare")[0].read_text(encoding="utf-8")[:60000]
    tok = tokenize.train("bpe", [text], 400, special_tokens=default_special_tokens("bpe"), show_progress=False)
    cfg = make_config(vocab_size=tok.vocab_size, n_layer=2, n_head=4, d_model=64, max_seq_len=64, arch="llama",
                      norm="rmsnorm", norm_bias=False, mlp="swiglu", pos="rope", qkv_bias=False, out_bias=False,
                      mlp_bias=False, tie_embeddings=False, n_kv_head=2, d_ff=128)
    torch.manual_seed(0)
    model = perturbed(Transformer(cfg), 0.05)
    save(model, d / "model", tokenizer=tok)
    export_hf(model, d / "hf", tokenizer=tok)
    return d / "model", d / "hf"


@pytest.fixture(scope="module")
def in_tasks():
    old = os.getcwd()
    os.chdir(TASKS)
    yield TASKS
    os.chdir(old)


def _evaluate(model, tasks, **kw):
    import lm_eval
    from lm_eval.tasks import TaskManager

    # include_defaults=False: indexing lm-eval's thousands of built-in task files costs 10-50 s per manager
    tm = TaskManager(include_path=str(TASKS), include_defaults=False)
    return lm_eval.simple_evaluate(model=model, tasks=tasks, task_manager=tm, log_samples=True, **kw)


def _by_doc(result, task):
    return {s["doc_id"]: s for s in result["samples"][task]}


def _answers(sample) -> list:
    """One answer per request of a logged lm-eval sample: (logprob, is_greedy), a logprob, or a text."""
    return [r[0] for r in sample["resps"]]


def _same(task: str, u, v) -> bool:
    """Two answers to one request agree: log-likelihoods to 1e-4 (and is_greedy exactly), texts exactly."""
    if task.startswith("lmf_choice"):
        return abs(u[0] - v[0]) < 1e-4 and bool(u[1]) == bool(v[1])
    if task == "lmf_rolling":
        return abs(u - v) < 1e-4
    return u == v


def _need_accelerate():
    try:
        import accelerate  # noqa: F401  (lm-eval's hf backend imports it)
    except ImportError:
        msg = "lm-eval's hf backend needs accelerate (pip install accelerate; the ref extra should list it)"
        if in_ci():
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="module")
def ours(tiny, in_tasks):
    """lm-eval through the adapter, in process, model named as on the CLI."""
    import lmforge.evaluate.lm_eval_adapter  # noqa: F401  (registers "lmforge")

    return _evaluate("lmforge", ALL, model_args=f"checkpoint={tiny[0]}", batch_size="auto")


@pytest.fixture(scope="module")
def theirs(tiny, in_tasks):
    """lm-eval's hf backend on the HF export: defaults for the choice and generation tasks, add_bos_token=False
    for the rolling one (see the module docstring)."""
    _need_accelerate()
    args = f"pretrained={tiny[1]},device=cpu,dtype=float32"
    a = _evaluate("hf", [t for t in ALL if t != "lmf_rolling"], model_args=args, batch_size=8)
    b = _evaluate("hf", ["lmf_rolling"], model_args=args + ",add_bos_token=False", batch_size=8)
    for k in ("results", "samples"):
        a[k].update(b[k])
    return a


# ---- the adapter against lm-eval's hf backend ----

def test_the_tasks_exercise_what_they_should(tiny, ours):
    """Guards that make the comparisons below mean something: a passage longer than the model's window (so
    rolling windows are cut), greedy continuations that differ by prompt, choices with different scores."""
    from lmforge.model import load

    _, tok = load(tiny[0])
    rows = [json.loads(line) for line in (TASKS / "lmf_rolling.jsonl").read_text().splitlines()]
    assert max(len(tok.encode(r["text"])) for r in rows) > 2 * 64
    gens = [_answers(s)[0] for s in ours["samples"]["lmf_generate"]]
    assert len(gens) == 6 and len(set(gens)) >= 5 and all(gens)
    for s in ours["samples"]["lmf_choice"]:
        lls = [a[0] for a in _answers(s)]
        assert len(set(lls)) == len(lls)
    assert ours["results"]["lmf_choice"]["sample_len"] == 8


@pytest.mark.parametrize("task", ALL)
def test_adapter_matches_lm_eval_hf_backend_on_the_export(ours, theirs, task):
    a, b = _by_doc(ours, task), _by_doc(theirs, task)
    assert sorted(a) == sorted(b) and len(a) >= 5
    for doc_id in a:
        assert a[doc_id]["arguments"] == b[doc_id]["arguments"], doc_id  # the same requests
        x, y = _answers(a[doc_id]), _answers(b[doc_id])
        assert len(x) == len(y)
        for u, v in zip(x, y):
            assert _same(task, u, v), (doc_id, u, v)
    for m in METRICS[task]:
        assert ours["results"][task][m] == pytest.approx(theirs["results"][task][m], rel=1e-5, abs=1e-6), m


def test_hf_backend_with_its_default_bos_double_counts_rolling(tiny, in_tasks, ours):
    """Why the rolling task runs with add_bos_token=False on the hf side: with the defaults, lm-eval scores
    <|bos|> after its <|bos|> prefix, so every passage gets a different (lower) log-likelihood."""
    _need_accelerate()
    r = _evaluate("hf", ["lmf_rolling"], model_args=f"pretrained={tiny[1]},device=cpu,dtype=float32", batch_size=8,
                  limit=2)
    for s in r["samples"]["lmf_rolling"]:
        mine = _answers(_by_doc(ours, "lmf_rolling")[s["doc_id"]])[0]
        assert _answers(s)[0] < mine - 1.0


def test_adapter_on_the_hf_export_answers_as_on_the_lmforge_checkpoint(tiny, in_tasks, ours):
    """checkpoint= an HF directory: LocalLM reads its TokenSpec from the export (BOS from the post-processor), so
    the same requests get the same answers."""
    import lmforge.evaluate.lm_eval_adapter  # noqa: F401

    r = _evaluate("lmforge", ["lmf_choice", "lmf_rolling"], model_args=f"checkpoint={tiny[1]}", limit=3)
    for task in ("lmf_choice", "lmf_rolling"):
        for doc_id, s in _by_doc(r, task).items():
            for u, v in zip(_answers(s), _answers(_by_doc(ours, task)[doc_id])):
                assert _same(task, u, v), (task, doc_id, u, v)


# ---- lmforge's own loader and harness on the same YAML ----

@pytest.fixture(scope="module")
def harness_run(tiny, tmp_path_factory):
    """lmforge.evaluate.task.load_task on the lm-eval YAML files, harness.evaluate on LocalLM: the result
    object and the per-sample log lines by task and doc_id."""
    from lmforge.evaluate import harness
    from lmforge.evaluate.local import LocalLM
    from lmforge.evaluate.task import load_task

    tasks = [t for n in ALL for t in load_task(TASKS / f"{n}.yaml")]
    assert [t.name for t in tasks] == ALL
    d = tmp_path_factory.mktemp("harness")
    r = harness.evaluate(LocalLM.from_checkpoint(tiny[0]), tasks, samples_dir=d / "samples", bootstrap=0,
                         progress=False)
    lines = {n: {x["doc_id"]: x for x in map(json.loads, (d / "samples" / f"{n}.jsonl").read_text().splitlines())}
             for n in ALL}
    return r, lines


@pytest.mark.parametrize("task", ALL)
def test_lmforge_harness_on_lm_eval_yaml_matches_lm_eval_through_the_adapter(ours, harness_run, task):
    """The same request strings (lmforge's loader builds prompts as lm-eval does, few-shot included), the same
    per-sample log-likelihoods (1e-4) and generations, the same scores."""
    r, lines = harness_run
    a, b = _by_doc(ours, task), lines[task]
    assert sorted(a) == sorted(b) and len(a) >= 5
    for d in a:
        theirs = [list(x) for x in a[d]["arguments"]]
        assert b[d]["requests"] == theirs, (d, b[d]["requests"], theirs)
        x, y = b[d]["responses"], _answers(a[d])
        assert len(x) == len(y)
        for u, v in zip(x, y):
            assert _same(task, u, v), (d, u, v)
    assert r["tasks"][task]["n"] == ours["results"][task]["sample_len"]
    # the few-shot prompts outgrow the 64-token window: left truncation agrees too (here and with the hf backend)
    assert (r["tasks"][task]["truncated"] > 0) == (task in FEWSHOT)
    for m in METRICS[task]:
        ours_value = r["tasks"][task]["metrics"][m.split(",")[0]]["value"]
        assert ours_value == pytest.approx(ours["results"][task][m], rel=1e-6, abs=1e-9), m


# ---- the CLI route ----

# lm-eval's CLI always indexes its built-in tasks (10-50 s); the quick run turns that off inside the child
# process, the slow one runs the route exactly as a user does
_NO_DEFAULTS = ("import functools, sys, lm_eval.tasks as t\n"
                "t.TaskManager.__init__ = functools.partialmethod(t.TaskManager.__init__, include_defaults=False)\n"
                "from lmforge.evaluate.lm_eval_adapter import main\n"
                "sys.exit(main())\n")


def _cli(tiny, tmp_path, quick: bool):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    head = [sys.executable, "-c", _NO_DEFAULTS] if quick else [sys.executable, "-m", "lmforge.evaluate.lm_eval_adapter"]
    p = subprocess.run(head + ["--model", "lmforge", "--model_args", f"checkpoint={tiny[0]}", "--tasks", "lmf_choice",
                               "--include_path", str(TASKS), "--batch_size", "auto", "--output_path", str(out)],
                       cwd=TASKS, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    files = list(out.rglob("results_*.json"))
    assert len(files) == 1, list(out.rglob("*"))
    assert "lmf_choice" in p.stdout  # lm-eval's own table
    return json.loads(files[0].read_text())


def test_cli_route_runs_lm_eval_with_the_lmforge_model(tiny, ours, tmp_path):
    """lm-eval's own CLI (``cli_evaluate``) through the adapter's ``main``, lmforge registered: the same
    scores as in process."""
    res = _cli(tiny, tmp_path, quick=True)
    assert res["config"]["model"] == "lmforge" and res["config"]["model_num_parameters"] > 0  # get_model_info
    for m in METRICS["lmf_choice"]:
        assert res["results"]["lmf_choice"][m] == pytest.approx(ours["results"]["lmf_choice"][m], abs=1e-12)


@pytest.mark.slow
def test_cli_route_as_a_user_runs_it(tiny, ours, tmp_path):
    """``python -m lmforge.evaluate.lm_eval_adapter --model lmforge ...``, nothing patched."""
    res = _cli(tiny, tmp_path, quick=False)
    for m in METRICS["lmf_choice"]:
        assert res["results"]["lmf_choice"][m] == pytest.approx(ours["results"]["lmf_choice"][m], abs=1e-12)


def test_cli_route_reports_bad_arguments_without_a_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-m", "lmforge.evaluate.lm_eval_adapter", "--no-such-flag"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--no-such-flag" in p.stderr


# ---- lm-eval stays optional; the registry ----

def test_lmforge_imports_without_lm_eval_and_the_adapter_registers():
    code = (
        "import importlib, pkgutil, sys\n"
        "import lmforge, lmforge.cli, lmforge.evaluate\n"
        "for m in pkgutil.iter_modules(lmforge.evaluate.__path__):\n"
        "    if m.name != 'lm_eval_adapter':\n"
        "        importlib.import_module('lmforge.evaluate.' + m.name)\n"
        "assert 'lm_eval' not in sys.modules, sorted(k for k in sys.modules if k.startswith('lm_eval'))\n"
        "from lmforge.evaluate.lm_eval_adapter import LMForgeLM\n"
        "from lm_eval.api.registry import get_model, model_registry\n"
        "assert get_model('lmforge') is LMForgeLM\n"
        "assert 'hf' in model_registry and 'dummy' in model_registry  # lm-eval's own models still found\n"
        "import lmforge.evaluate.lm_eval_adapter as again; again.register()\n"
        "print('ok')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-3000:]


# ---- model_args and bad input ----

def test_model_args_are_checked_by_name(tiny):
    from lmforge.evaluate.lm_eval_adapter import LMForgeLM

    with pytest.raises(ValueError, match="unknown argument.*temperature.*accepted: checkpoint"):
        LMForgeLM.create_from_arg_string(f"checkpoint={tiny[0]},temperature=0.5")
    with pytest.raises(ValueError, match="checkpoint=DIR is required"):
        LMForgeLM()
    with pytest.raises(ValueError, match="batch_size must be a positive int or 'auto', got 'many'"):
        LMForgeLM(checkpoint=str(tiny[0]), batch_size="many")
    with pytest.raises(ValueError, match="batch_size must be a positive int or 'auto', got 0"):
        LMForgeLM(checkpoint=str(tiny[0]), batch_size=0)
    with pytest.raises(ValueError, match="max_length must be"):
        LMForgeLM(checkpoint=str(tiny[0]), max_length="long")
    with pytest.raises(ValueError, match="name two models"):
        LMForgeLM(checkpoint=str(tiny[0]), pretrained=str(tiny[1]))
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        LMForgeLM(checkpoint=str(tiny[0].parent / "no-such-dir"))
    # lm-eval's forms: additional_config from simple_evaluate, pretrained= as for hf, an HF directory
    lm = LMForgeLM.create_from_arg_string(f"pretrained={tiny[1]},max_length=32",
                                          {"batch_size": "4", "max_batch_size": None, "device": "cpu"})
    assert lm.max_length == 32 and lm.lm.batch_size == 4 and lm.checkpoint == str(tiny[1])
    assert lm.tokenizer_name == str(tiny[1]).replace("/", "__")
    assert LMForgeLM(checkpoint=str(tiny[0]), batch_size="auto:4").lm.batch_size is None


def test_truncation_is_counted_and_gen_kwargs_normalized(tiny):
    from lm_eval.api.instance import Instance

    from lmforge.evaluate.lm_eval_adapter import LMForgeLM

    lm = LMForgeLM(checkpoint=str(tiny[0]), max_length=16)
    long = "To be, or not to be, that is the question: whether 'tis nobler in the mind"
    reqs = [Instance("loglikelihood", {}, (long, " to suffer"), 0), Instance("loglikelihood", {}, ("To", " be"), 1)]
    out = lm.loglikelihood(reqs)
    assert lm.stats["truncated"] == 1 and all(isinstance(x[0], float) and isinstance(x[1], bool) for x in out)
    # 'until' as one string (lm-eval allows it) is a list for lmforge; the same text either way
    g1 = lm.generate_until([Instance("generate_until", {}, ("Q: Who?\nA:", {"until": "\n", "max_gen_toks": 4}), 0)])
    g2 = lm.generate_until([Instance("generate_until", {}, ("Q: Who?\nA:", {"until": ["\n"], "max_gen_toks": 4}), 0)])
    assert g1 == g2 and "\n" not in g1[0]
    with pytest.raises(ValueError, match="'until' must be a string or a list of strings"):
        lm.generate_until([Instance("generate_until", {}, ("Q:", {"until": 5}), 0)])


def test_lm_eval_response_cache_is_filled_through_the_cache_hook(tiny, in_tasks, ours, tmp_path):
    """``--use_cache``: every answer goes into lm-eval's cache under lm-eval's key, so a second run asks the model
    nothing and scores the same."""
    from lmforge.evaluate.lm_eval_adapter import LMForgeLM
    from lmforge.evaluate.local import LocalLM

    calls = []

    class Counting(LocalLM):
        def run(self, requests):  # (not used by the adapter; the kinds below are)
            raise AssertionError("the adapter calls each kind directly")

        def loglikelihood(self, requests):
            calls.append(("loglikelihood", len(requests)))
            return super().loglikelihood(requests)

        def loglikelihood_rolling(self, requests):
            calls.append(("loglikelihood_rolling", len(requests)))
            return super().loglikelihood_rolling(requests)

        def generate_until(self, requests):
            calls.append(("generate_until", len(requests)))
            return super().generate_until(requests)

    from lmforge.infer.llm import load_with_tokenizer

    model, tok, spec = load_with_tokenizer(tiny[0])
    db = str(tmp_path / "cache")
    first = _evaluate(LMForgeLM(lm=Counting(model, tok, tokens=spec)), NAMES, use_cache=db, limit=3)
    assert sorted(k for k, _ in calls) == ["generate_until", "loglikelihood", "loglikelihood_rolling"]
    calls.clear()
    second = _evaluate(LMForgeLM(lm=Counting(model, tok, tokens=spec)), NAMES, use_cache=db, limit=3)
    assert calls == []
    for task in NAMES:
        assert [_answers(s) for s in second["samples"][task]] == [_answers(s) for s in first["samples"][task]]
        for doc_id, s in _by_doc(first, task).items():  # and the cached answers are the uncached run's
            for u, v in zip(_answers(s), _answers(_by_doc(ours, task)[doc_id])):
                assert _same(task, u, v), (task, doc_id, u, v)


# ---- chat templates ----

def test_chat_template_renders_as_transformers_does(tiny):
    import transformers

    from lmforge.evaluate.lm_eval_adapter import LMForgeLM

    lm = LMForgeLM(checkpoint=str(tiny[0]))
    hf_tok = transformers.AutoTokenizer.from_pretrained(tiny[1])
    msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who is Hamlet?"}]
    assert lm.chat_template(True) == hf_tok.chat_template and lm.chat_template(False) is None
    assert lm.apply_chat_template(msgs) == hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    prefilled = msgs + [{"role": "assistant", "content": "The prince"}]
    assert lm.apply_chat_template(prefilled, add_generation_prompt=False) == hf_tok.apply_chat_template(
        prefilled, tokenize=False, add_generation_prompt=False, continue_final_message=True)
    with pytest.raises(ValueError, match="last message must be the assistant's"):
        lm.apply_chat_template(msgs, add_generation_prompt=False)


def test_chat_templated_tasks_match_the_hf_backend(tiny, in_tasks):
    """``--apply_chat_template`` (with ``--fewshot_as_multiturn`` and ``--system_instruction``): the
    conversation's control tokens reach the model as control tokens on both sides (lm-eval's hf backend parses
    them from the text; LocalLM keeps the ids it rendered)."""
    _need_accelerate()
    import lmforge.evaluate.lm_eval_adapter  # noqa: F401

    tasks = ["lmf_choice", "lmf_generate", "lmf_choice_fewshot"]
    kw = dict(apply_chat_template=True, fewshot_as_multiturn=True, system_instruction="Be brief.", limit=3)
    a = _evaluate("lmforge", tasks, model_args=f"checkpoint={tiny[0]}", **kw)
    b = _evaluate("hf", tasks, model_args=f"pretrained={tiny[1]},device=cpu,dtype=float32", batch_size=4, **kw)
    for task in tasks:
        x, y = _by_doc(a, task), _by_doc(b, task)
        assert sorted(x) == sorted(y) == [0, 1, 2]
        for d in x:
            assert x[d]["arguments"] == y[d]["arguments"]
            ctx = x[d]["arguments"][0][0]
            assert ctx.startswith("<|bos|><|system|>Be brief.") and ctx.endswith("<|assistant|>")
            if task in FEWSHOT:
                assert ctx.count("<|assistant|>") == 3  # two examples as turns, then the question's
            for u, v in zip(_answers(x[d]), _answers(y[d])):
                assert _same(task, u, v), (d, u, v)
