"""The pipeline's quantize stage: a tiny recipe (pretrain, eval, quantize, export) runs end to end: the final
model quantized with [quantize]'s settings into ``quantized/`` (it loads back with the logits of the same
quantization done by hand, calibrated on the run's train split), the GGUF beside the HF export (lmforge's
reader opens it: the architecture, every tensor of the model, the type asked for), ``quant.json`` (fp32 vs
quantized: test bits per byte as ``lmforge eval`` gives them, bytes, greedy decode through the engine) and the
report's table; a rerun skips it, a changed [quantize] setting reruns it and the stages after it only, and a
bad [quantize] field is refused before any work, naming it."""
import json

import pytest
import torch

from lmforge._io import file_sha256
from lmforge.pipeline import StageError, load_recipe, run_recipe

from test_pipeline import tiny_sets

STAGES = ["fetch", "clean", "tokenizer", "shards", "pretrain", "eval", "quantize", "export"]
# small calibration (the tiny corpus' train split) and a short decode: the stage in seconds
TINY_QUANT = ["quantize.calib_samples=4", "quantize.calib_seq_len=32", "quantize.decode_tokens=8",
              "quantize.gguf=q8_0"]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, corpus_files):
    d = tmp_path_factory.mktemp("plays")
    for p in corpus_files[:4]:
        (d / p.name).write_text(p.read_text()[:8000])
    return d


def recipe(corpus, *more):
    r, _ = load_recipe("default", tiny_sets(corpus) + [f"stages={json.dumps(STAGES)}", "eval.tasks=[]",
                                                       "train.final_eval_batches=2", *TINY_QUANT, *more])
    return r


def manifest(run):
    return json.loads((run / "run.json").read_text())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the stage's figures (decode tokens/s) on one thread; the 2 cores are shared with the rest of the suite
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def finished(small_corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("quantrun") / "run"
    summary = run_recipe(recipe(small_corpus), run, quiet=True)
    return run, summary


def test_quantize_stage_end_to_end(finished, small_corpus):
    from lmforge.evaluate.perplexity import evaluate_shards
    from lmforge.model import load
    from lmforge.quant.api import quantize
    from lmforge.quant.checkpoint import is_quantized, load_quantized
    from lmforge.quant.linear import QuantLinear
    from lmforge.pipeline.recipe import quant_config

    run, summary = finished
    r = recipe(small_corpus)
    m = manifest(run)
    assert list(m["stages"]) == STAGES and all(s["status"] == "done" for s in m["stages"].values())
    q = json.loads((run / "quant.json").read_text())
    assert q["source"] == "model" and q["config"] == quant_config(r.quantize).to_dict()

    # quantized/: the final model quantized by [quantize] (calibrated on the run's shards), loaded back exactly
    assert is_quantized(run / "quantized") and not is_quantized(run / "model")
    qmodel, _ = load_quantized(run / "quantized")
    swapped = {n for n, mod in qmodel.named_modules() if isinstance(mod, QuantLinear)}
    assert swapped and "lm_head" not in swapped  # (the default skip)
    ref, _ = load(run / "model")
    quantize(ref, quant_config(r.quantize), data_dir=run / "data", progress=False)
    x = torch.randint(0, ref.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(qmodel(x), ref(x))
        fp32, _ = load(run / "model")
        assert not torch.equal(fp32(x), ref(x))  # (quantizing changed something)

    # quant.json: the fp32 number is the eval stage's, the quantized one as lmforge eval measures it
    ev = json.loads((run / "eval.json").read_text())
    assert q["fp32"]["test_bpb"] == ev["bits_per_byte"] and q["fp32"]["from"] == "eval.json"
    qev = evaluate_shards(qmodel, run / "data", "test", r.train.seq_len, batch_size=8)
    assert q["quantized"]["test_bpb"] == pytest.approx(qev["bits_per_byte"], rel=1e-6)
    assert q["quantized"]["test_bpb"] != q["fp32"]["test_bpb"]
    for side, d in (("fp32", run / "model"), ("quantized", run / "quantized")):
        assert q[side]["file_bytes"] == (d / "model.safetensors").stat().st_size
        assert q[side]["decode_tokens"] == 8 and q[side]["decode_tok_s"] > 0
    from lmforge.quant.api import model_bytes

    assert q["quantized"]["weight_bytes"] == model_bytes(qmodel) and q["fp32"]["weight_bytes"] == model_bytes(fp32)
    assert q["quantized"]["weight_bytes"] < q["fp32"]["weight_bytes"]
    assert 0 <= q["decode"]["same_greedy_prefix"] <= 8 and q["decode"]["prompt"] == r.quantize.prompt
    # int8 groups of 32 run in the engine's C step wherever fp32 does (the native extension built)
    assert q["quantized"]["fast_decode"] == q["fp32"]["fast_decode"]
    assert q["report"]["layers"].keys() == swapped

    # the GGUF beside the HF export: the fp32 final model, Q8_0 where llama.cpp quantizes
    from lmforge.quant.gguf import GGMLType, read_gguf

    assert q["gguf"]["path"] == "export/model-q8_0.gguf"
    g = read_gguf(run / "export" / "model-q8_0.gguf")
    assert g.metadata["general.architecture"] == "qwen3"
    assert q["gguf"]["bytes"] == (run / "export" / "model-q8_0.gguf").stat().st_size
    assert GGMLType.Q8_0 in {t.type for t in g.tensors.values()}
    assert len(g.tensors) >= len([k for k in fp32.state_dict() if "rope" not in k])
    assert (run / "hf" / "model.safetensors").exists()  # (the export stage ran after)

    # run.json, summary.json and the report
    st = m["stages"]["quantize"]["summary"]
    assert st["quant_test_bpb"] == q["quantized"]["test_bpb"] and st["fp32_test_bpb"] == ev["bits_per_byte"]
    assert st["gguf_bytes"] == q["gguf"]["bytes"] and st["method"] == r.quantize.method
    assert set(m["stages"]["quantize"]["outputs"]) == {str(run / p) for p in (
        "quantized/model.safetensors", "quantized/config.json", "quant.json", "export/model-q8_0.gguf")}
    assert summary["quant_test_bpb"] == q["quantized"]["test_bpb"] and summary["gguf"] == "export/model-q8_0.gguf"
    report = (run / "report.md").read_text()
    sec = report.split("## Quantization")[1].split("\n## ")[0]
    from lmforge.pipeline.report import quant_label

    f, z = q["fp32"], q["quantized"]
    assert f"| fp32 | {f['test_bpb']:.4f} | - |" in sec
    assert f"| {quant_label(q['config'])} | {z['test_bpb']:.4f} | {z['test_bpb'] - f['test_bpb']:+.4f} |" in sec
    assert f"| GGUF q8_0 (`export/model-q8_0.gguf`) |" in sec
    assert f"llama-cli -m {run / 'export' / 'model-q8_0.gguf'}" in sec and "llama_cpp.Llama(" in sec
    assert "`quantized/`" in report.split("## Artifacts")[1]


def test_rerun_skips_and_a_changed_setting_reruns_quantize_and_after(finished, small_corpus, monkeypatch):
    from lmforge.quant import calib as C

    run = finished[0]
    m0 = manifest(run)
    run_recipe(recipe(small_corpus), run, quiet=True)
    assert (run / "run.log").read_text().count("quantize: unchanged, skipped") == 1
    assert manifest(run)["stages"] == m0["stages"]

    # GPTQ, 4 bits with zero points: calibrated on the run's train split, [quantize]'s window count and length
    old = file_sha256(run / "quantized" / "model.safetensors")
    calls, real = [], C.calibration_tokens

    def spy(data_dir, n_samples=128, seq_len=256, seed=0, split="train"):
        calls.append((str(data_dir), n_samples, seq_len, split))
        return real(data_dir, n_samples, seq_len, seed, split)

    monkeypatch.setattr(C, "calibration_tokens", spy)
    run_recipe(recipe(small_corpus, "quantize.method=gptq", "quantize.bits=4", "quantize.sym=false",
                      "quantize.gguf=q4_0"), run, quiet=True)
    assert calls == [(str(run / "data"), 4, 32, "train")]
    m1 = manifest(run)
    for name, s in m1["stages"].items():
        if name in ("quantize", "export"):
            assert s["started"] > m0["stages"][name]["started"], name
        else:
            assert s == m0["stages"][name], name
    q = json.loads((run / "quant.json").read_text())
    assert (q["config"]["method"], q["config"]["bits"], q["config"]["sym"], q["gguf"]["type"]) == ("gptq", 4, False, "q4_0")
    assert file_sha256(run / "quantized" / "model.safetensors") != old
    from lmforge.quant.linear import IntLinear
    from lmforge.quant.checkpoint import load_quantized

    mods = [mod for mod in load_quantized(run / "quantized")[0].modules() if isinstance(mod, IntLinear)]
    assert mods and all(mod.qweight.dtype == torch.uint8 for mod in mods)  # two 4-bit codes a byte
    assert mods[0].qweight.shape[1] * 2 == mods[0].in_features
    assert str(run / "export" / "model-q4_0.gguf") in m1["stages"]["quantize"]["outputs"]


@pytest.mark.parametrize("sets, msg", [
    (["quantize.method=rtm"], "quantize.method: got 'rtm', expected one of"),
    (["quantize.bits=9"], "quantize.bits: got 9"),
    (["quantize.granularity=row"], "quantize.granularity: got 'row'"),
    (["quantize.group_size=48"], "quantize.group_size: 48 does not divide the rows of blocks.0.attn.qkv"),
    (["quantize.gguf=q5_k"], "quantize.gguf: unknown GGUF type 'q5_k'"),
    (['train.model={"mlp": "swiglu", "d_ff": 64, "arch": "qwen3", "d_model": 48, "n_head": 2, "n_layer": 1}',
      "quantize.granularity=channel"], "quantize.gguf: export_gguf: tensor token_embd.weight has rows of 48 values"),
    (["quantize.method=gptq", "quantize.calib_seq_len=4096"],
     "quantize.calib_seq_len: 4096 is longer than the model's context"),
    (["quantize.decode_tokens=0"], "quantize.decode_tokens: expected a positive number"),
    (["quantize.bitz=4"], "unknown field 'quantize.bitz'"),
    (['train.model={"mlp": "swiglu", "d_ff": 64, "arch": "none", "d_model": 32, "n_head": 2, "n_layer": 1}',
      "export.arch=none"], "quantize.gguf: export_gguf: ModelConfig.hf_family: 'none'"),
])
def test_bad_quantize_field_is_refused_before_any_work(small_corpus, tmp_path, sets, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(".", r"\.")) as e:
        run_recipe(recipe(small_corpus, *sets), tmp_path / "run", quiet=True)
    assert "did you mean 'rtn'" in str(e.value) if sets == ["quantize.method=rtm"] else True
    assert not (tmp_path / "run").exists()  # refused by load_recipe: nothing was written


def test_quantize_without_a_model_names_the_stage(small_corpus, tmp_path):
    # (a recipe of the quantize stage alone on a run directory that has no model yet)
    r = recipe(small_corpus, 'stages=["quantize"]')
    with pytest.raises(StageError, match=r"quantize: no model in .*model \(the pretrain stage makes it"):
        run_recipe(r, tmp_path / "run", quiet=True)
    assert manifest(tmp_path / "run")["stages"]["quantize"]["status"] == "failed"


def test_gguf_auto_writes_q8_0_where_the_model_fits_and_explicit_types_are_checked(small_corpus):
    from lmforge.pipeline.recipe import resolve_gguf
    from lmforge.train.trainer import model_config

    fits = model_config(recipe(small_corpus).train)  # qwen3-shaped, rows of 32 and 64
    assert resolve_gguf(fits, "auto") == ("q8_0", None) and resolve_gguf(fits, "q4_0") == ("q4_0", None)
    assert resolve_gguf(fits, "none") == (None, "quantize.gguf = 'none'")
    gelu = 'train.model={"d_model": 32, "n_head": 2, "n_layer": 1}'  # the preset's own feed-forward (not swiglu)
    r = recipe(small_corpus, gelu, "quantize.gguf=auto")  # (not refused: auto writes what fits)
    t, why = resolve_gguf(model_config(r.train), "auto")
    assert t is None and "ModelConfig.ffn.activation must be 'swiglu'" in why and r.quantize.gguf == "auto"
    with pytest.raises(ValueError, match="quantize.gguf: export_gguf: cannot export as GGUF qwen3: "
                                         "ModelConfig.ffn.activation"):
        recipe(small_corpus, gelu, "quantize.gguf=q8_0")
    # a calibration window longer than the context matters only to a method that calibrates
    assert recipe(small_corpus, "quantize.calib_seq_len=4096").quantize.calib_seq_len == 4096
