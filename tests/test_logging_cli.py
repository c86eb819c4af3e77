"""What lmforge says on stderr (``--log-level``, ``LMFORGE_LOG_LEVEL``), that library code prints nothing,
a --checkpoint that names a file instead of its directory, and `model info` on a near-miss preset name."""
import json
import logging
import subprocess
import sys

import pytest
import torch

from lmforge.cli import main


def _lmforge(*args, env_level=None, cwd=None):
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("LMFORGE_LOG_LEVEL", None)
    if env_level is not None:
        env["LMFORGE_LOG_LEVEL"] = env_level
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, corpus_files):
    """A tokenizer and a prepared directory whose tiny validation split draws a held-out warning."""
    from lmforge import tokenize

    d = tmp_path_factory.mktemp("logs")
    (d / "in").mkdir()
    for i, f in enumerate(corpus_files[:3]):
        (d / "in" / f"doc{i}.txt").write_text(f.read_text(encoding="utf-8")[20000:40000])
    tok = tokenize.train("char", sorted(str(f) for f in (d / "in").iterdir()), 0, special_tokens=["<|endoftext|>"],
                         show_progress=False)
    tok.save(d / "tok.json")
    return d


def test_log_levels_of_a_data_command(shards, tmp_path):
    args = ["data", "prepare", "-i", str(shards / "in"), "-t", str(shards / "tok.json"), "-q"]
    info = _lmforge(*args, "-o", str(tmp_path / "a"))
    assert info.returncode == 0, info.stderr
    warnings = [ln for ln in info.stderr.splitlines() if ln.startswith("lmforge: warning: ")]
    assert warnings, info.stderr  # the held-out splits of three documents are too small: said at the default level
    assert "workers)" not in info.stderr  # the debug line (step times) hidden by default

    debug = _lmforge("--log-level", "debug", *args, "-o", str(tmp_path / "b"))
    assert debug.returncode == 0, debug.stderr
    dbg = [ln for ln in debug.stderr.splitlines() if ln.startswith("lmforge: ") and ln.endswith("workers)")]
    assert dbg and not dbg[0].startswith("lmforge: debug:"), debug.stderr  # plain "lmforge: message" below warning

    warn = _lmforge("--log-level", "WARNING", *args, "-o", str(tmp_path / "w"))
    assert warn.returncode == 0 and warn.stderr.replace("/w:", "/a:").splitlines() == warnings, warn.stderr

    quiet = _lmforge("--log-level", "error", *args, "-o", str(tmp_path / "c"))
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr

    env = _lmforge(*args, "-o", str(tmp_path / "d"), env_level="ERROR")
    assert env.returncode == 0 and env.stderr == "", env.stderr


def test_warning_level_silences_info_lines(tmp_path, corpus_files):
    # `data fetch` of a corpus already there says where it is at debug level, and the path on stdout
    r = _lmforge("--log-level", "debug", "data", "fetch")
    assert r.returncode == 0, r.stderr
    assert "already fetched" in r.stderr and r.stdout.strip().endswith("shakespeare")
    r = _lmforge("--log-level", "warning", "data", "fetch")
    assert r.returncode == 0 and r.stderr == "" and r.stdout.strip().endswith("shakespeare")
    # an info line (what a fetch did) is shown at info and not at warning
    log = logging.getLogger("lmforge.data")
    for level, shown in (("info", True), ("warning", False)):
        from lmforge import cli

        cli._setup_logging(level)
        import io

        err, sys.stderr = sys.stderr, io.StringIO()
        try:
            log.info("a fetch line")
            log.warning("a warning line")
            out = sys.stderr.getvalue()
        finally:
            sys.stderr = err
        assert ("lmforge: a fetch line" in out) is shown
        assert "lmforge: warning: a warning line" in out
    cli._setup_logging("info")  # as main() leaves it by default


@pytest.mark.parametrize("argv,env", [(["--log-level", "loud"], None), ([], "loud")])
def test_a_bad_log_level_is_a_usage_error(argv, env):
    r = _lmforge(*argv, "model", "info", env_level=env)
    assert r.returncode == 2, r.stderr
    for lv in ("debug", "info", "warning", "error", "critical"):
        assert lv in r.stderr
    assert "loud" in r.stderr


def test_library_functions_print_nothing_to_stdout(shards, tmp_path, capfd):
    from lmforge.data import fetch
    from lmforge.data.prepare import make_config, prepare
    from lmforge.data.stats import collect

    fetch("shakespeare")
    prepare(make_config([str(shards / "in")], None, []), shards / "tok.json", tmp_path / "p", quiet=True)
    collect(tmp_path / "p")
    out, _ = capfd.readouterr()
    assert out == ""


def test_tokenizer_demo_table_is_built_from_the_summary():
    from lmforge.tokenize.demo import format_table

    s = {k: {"train_s": 1.5, "bytes_per_token": 3.25, "vocab_used_fraction": 0.5} for k in
         ("bpe", "wordpiece", "unigram")}
    s["chat"] = {"tokens": 12, "trained": 5, "parsed_back": {"role": "assistant", "content": "x"}}
    lines = format_table(s).splitlines()
    assert len(lines) == 5 and lines[1].split()[:3] == ["bpe", "1.50", "3.250"] and lines[1].endswith("50.0%")
    assert lines[-1].startswith("chat: 12 tokens, 5 trained")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, corpus_files):
    from lmforge import tokenize
    from lmforge.model import make_config, save
    from lmforge.model.transformer import Transformer

    tok = tokenize.train("char", [str(corpus_files[0])], 0, special_tokens=["<|endoftext|>"], show_progress=False)
    torch.manual_seed(0)
    m = Transformer(make_config(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=32, max_seq_len=64))
    return save(m, tmp_path_factory.mktemp("ckpt") / "m", tokenizer=tok)


@pytest.mark.parametrize("cmd", [["generate", "Hi", "--max-tokens", "2"], ["eval", "--text", "x.txt"],
                                 ["export", "--out", "hf"], ["serve", "--port", "0"], ["chat"]])
def test_checkpoint_that_is_a_file_names_its_directory(model_dir, cmd, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = model_dir / "model.safetensors"
    assert main([cmd[0], "--checkpoint", str(f), *cmd[1:]]) == 2
    err = capsys.readouterr().err
    assert f"{f} is a file; --checkpoint takes the model directory that holds it ({model_dir})" in err, err
    assert not (tmp_path / "hf").exists()


def test_load_of_a_file_names_its_directory(model_dir):
    import lmforge
    from lmforge.model import load_config

    for fn in (lmforge.load, load_config):
        with pytest.raises(NotADirectoryError, match=f"is a file; .*model directory that holds it \\({model_dir}\\)"):
            fn(model_dir / "config.json")
    assert load_config(model_dir).n_layer == 1  # the directory itself loads


@pytest.mark.parametrize("name,hint", [("gpt2", "gpt2-124m"), ("GPT2-125M", "gpt2-124m"), ("llama", "llama-1b"),
                                       ("tiny_llama", "tiny-llama")])
def test_model_info_suggests_the_close_preset(name, hint, capsys):
    from lmforge.model import PRESETS

    assert main(["model", "info", name]) == 2
    err = capsys.readouterr().err
    assert f"did you mean {hint}?" in err, err
    assert all(p in err for p in PRESETS)  # and lists them all
    assert main(["model", "info", hint, "--json"]) == 0  # the suggestion is a real preset
    assert json.loads(capsys.readouterr().out)["config"]["n_layer"] >= 1


def test_model_info_without_a_close_preset_gives_no_guess(capsys):
    assert main(["model", "info", "qqqqqq"]) == 2
    err = capsys.readouterr().err
    assert "did you mean" not in err and "presets: gpt2-124m" in err
