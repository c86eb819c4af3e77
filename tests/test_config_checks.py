"""Checks come before work, and what runs is what is recorded (issue 15): recipe and pretrain
settings are validated by the stages' own rules before anything is read or trained; a preset means
the same in `pretrain` and the pipeline; `--print-config` / recipe.json show the settings in effect."""
import dataclasses
import json

import pytest

from lmforge.cli import _pretrain_config, build_parser, main
from lmforge.pipeline.recipe import load_recipe
from lmforge.pipeline.runner import resolved_recipe
from lmforge.train.trainer import RECIPES, TrainConfig, check_config


def recipe_file(tmp_path, body: str):
    p = tmp_path / "r.toml"
    p.write_text('name = "r"\n' + body)
    return str(p)


@pytest.mark.parametrize("body,msg", [
    ('[tokenizer]\nkind = "bpe"\nvocab_size = 262\n[train]\nmax_steps = 1\n', "needs at least 263"),
    ('[train]\nmax_steps = "10"\n', "train.max_steps: expected an integer, got '10'"),
    ('[train]\nmax_steps = 1\nschedule = "cosin"\n', "schedule: expected one of cosine, wsd, constant"),
    ('[train]\nmax_steps = 1\nmodel = { n_layr = 2 }\n', "did you mean 'n_layer'?"),
    ('[train]\nmax_steps = 1\nmodel = { n_head = 5 }\n', "heads do not divide d_model"),
    ('[train]\nmax_steps = 1\nrecompute = "every:0"\n', "recompute: expected none, full, selective or every:K"),
])
def test_recipe_settings_fail_validation_before_any_work(tmp_path, capsys, body, msg):
    assert main(["run", recipe_file(tmp_path, body), "--runs", str(tmp_path / "runs")]) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_set_merges_into_the_model_table(tmp_path):
    r, _ = load_recipe("default", ["train.model.n_layer=2"])
    assert r.train.model == {"mlp": "swiglu", "d_ff": 256, "arch": "qwen3", "n_layer": 2}


def test_a_preset_means_the_same_in_pretrain_and_the_pipeline(tmp_path):
    path = recipe_file(tmp_path, '[train]\npreset = "shakespeare-cpu"\nmax_steps = 5\nlr = 0.004\n')
    r, _ = load_recipe(path)
    assert r.train.lr == 0.004  # named in the file: kept
    for k, v in RECIPES["shakespeare-cpu"].items():
        if k not in ("lr", "tokenizer"):
            assert getattr(r.train, k) == v, k  # not named: the preset's recipe
    a = build_parser().parse_args(["pretrain", "--config", path, "--data", str(tmp_path)])
    cfg = _pretrain_config(a)
    cfg.data = r.train.data = ""
    assert dataclasses.asdict(cfg) == dataclasses.asdict(r.train)  # the same settings either way


def test_pretrain_config_takes_a_runs_own_train_config(tmp_path):
    t = dataclasses.asdict(TrainConfig(preset="tiny", max_steps=7, lr=0.01, data="d", out="o"))
    (tmp_path / "train_config.json").write_text(json.dumps({"train": t, "model": {"n_layer": 1}}))
    a = build_parser().parse_args(["pretrain", "--config", str(tmp_path / "train_config.json")])
    cfg = _pretrain_config(a)
    assert (cfg.max_steps, cfg.lr, cfg.data, cfg.model) == (7, 0.01, "d", {"n_layer": 1})


def test_a_tokenizer_with_shards_is_refused(tmp_path):
    with pytest.raises(ValueError, match="only used with text=FILE"):
        check_config(TrainConfig(data=str(tmp_path), tokenizer="bpe:512", max_steps=1))


def test_recorded_recipe_shows_the_corpus_settings_in_effect():
    r, _ = load_recipe("default")
    d = resolved_recipe(r)
    assert d["data"]["dedup"]["shingle_size"] == 3 and d["data"]["dedup"]["threshold"] == 0.1
    assert d["data"]["inputs"] and d["lmforge_version"]
