"""The pipeline runs a training stage on 2 DDP ranks when its recipe says ``nproc = 2``: the stage is
launched through ``lmforge.parallel.launch`` and its summary (run.json, report.md) names the strategy
and the ranks; final.json's ``parallel`` records them."""
import json

from test_pipeline import small_corpus, tiny_sets  # noqa: F401 (the fixture)

from lmforge.pipeline import load_recipe, run_recipe


def test_pretrain_stage_on_two_ranks(small_corpus, tmp_path):  # noqa: F811
    sets = [s for s in tiny_sets(small_corpus, steps=3) if not s.startswith(("sft.", "dpo.", "eval.", "demo."))]
    sets += ['stages=["fetch", "clean", "tokenizer", "shards", "pretrain"]', "train.nproc=2", "train.threads=1",
             "train.checkpoint_every=0"]
    r, _ = load_recipe("default", sets)
    run_recipe(r, tmp_path / "run", quiet=True)
    run = tmp_path / "run"
    fin = json.loads((run / "model" / "final.json").read_text())
    assert fin["parallel"] == {"strategy": "ddp", "world_size": 2, "dp_size": 2, "tp_size": 1} and fin["step"] == 3
    m = json.loads((run / "run.json").read_text())
    assert m["stages"]["pretrain"]["summary"]["parallel"] == "ddp on 2 ranks"
    assert "ddp on 2 ranks" in (run / "report.md").read_text()
    assert (run / "model" / "model.safetensors").exists()


def test_recipe_settings_for_ranks():
    """recipes/distributed.toml loads (pretrain on 2 DDP ranks, the default's global batch); nnodes > 1 is
    refused before any work (the pipeline launches on one machine)."""
    import pytest

    r, _ = load_recipe("distributed", [])
    d, _ = load_recipe("default", [])
    assert (r.train.parallel, r.train.nproc) == ("ddp", 2) and r.train.batch_size * 2 == d.train.batch_size
    assert d.train.nproc == 1 and d.train.parallel == "none"  # the default recipe stays one process
    with pytest.raises(ValueError, match=r"train.nnodes = 2: the pipeline launches a stage on this machine only"):
        load_recipe("default", ["train.nnodes=2"])
