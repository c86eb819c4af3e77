"""The server examples in docs/inference.md run, against a live server.

Knows: every fenced block right after a ``<!-- docs-run: open -->`` or ``<!-- docs-run:
keyed -->`` comment is run against a tiny model served as ``pt`` on a free port (the
docs' ``http://127.0.0.1:8000`` rewritten to it); ``keyed`` blocks against a server with an
API key, given to them as ``$LMFORGE_API_KEY``. A bash block runs one logical line
(``\\`` continuations joined) at a time under ``set -o pipefail``: each must exit 0 and
print something, print no OpenAI error object, and print what a trailing ``# prints: X``
comment promises. A python block runs as a script and must exit 0 and print something.
Does not check the generated text (the model is random; test_server.py checks answers).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_serve import live, tiny_model

DOC = Path(__file__).resolve().parent.parent / "docs" / "inference.md"
KEY = "sk-docs-test"


def blocks():
    """(kind, language, text, line) of every marked block."""
    out = []
    for m in re.finditer(r"<!-- docs-run: (\w+) -->\s*\n```(\w*)\n(.*?)\n```", DOC.read_text(), re.S):
        out.append((m.group(1), m.group(2), m.group(3), DOC.read_text()[:m.start()].count("\n") + 1))
    return out


def logical_lines(text):
    buf = ""
    for raw in text.splitlines():
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        line = (buf + raw).strip()
        buf = ""
        if line and not line.startswith("#"):
            yield line


def test_the_docs_have_runnable_server_examples():
    kinds = {(k, lang) for k, lang, _, _ in blocks()}
    assert {("open", "bash"), ("open", "python"), ("keyed", "bash"), ("keyed", "python")} <= kinds, kinds


@pytest.fixture(scope="module")
def servers(corpus_files):
    m, tok = tiny_model(corpus_files[0])
    with live(m, tok, model_name="pt", num_blocks=64) as (open_base, _), \
            live(m, tok, model_name="pt", api_key=KEY, num_blocks=64) as (keyed_base, _):
        yield {"open": open_base, "keyed": keyed_base}


@pytest.mark.parametrize("kind,lang,text,line", blocks(), ids=lambda v: str(v) if isinstance(v, int) else None)
def test_docs_example_runs(servers, kind, lang, text, line):
    text = text.replace("http://127.0.0.1:8000", servers[kind])
    env = {**os.environ, "LMFORGE_API_KEY": KEY}
    if lang == "python":
        r = subprocess.run([sys.executable, "-c", text], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0 and r.stdout.strip(), f"docs/inference.md:{line}: {r.stdout}\n{r.stderr}"
        return
    assert lang in ("bash", "sh", "")
    for cmd in logical_lines(text):
        want = re.search(r"#\s*prints:\s*(.+)$", cmd)
        r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, env=env, timeout=120)
        where = f"docs/inference.md:{line}: {cmd}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        assert r.returncode == 0 and r.stdout.strip(), where
        assert '"error":' not in r.stdout, where
        if want:
            assert want.group(1).strip() in r.stdout, where
