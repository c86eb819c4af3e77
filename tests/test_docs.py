"""The docs cannot drift from the code: every command they show must parse.

Knows how to find ``lmforge ...`` commands in README.md and docs/*.md (fenced
shell blocks, one command per line with ``\\`` continuations, ``$`` prompts,
pipes, ``&&``, redirections and ``#`` comments; inline code spans, where a
table's ``a\\|b`` lists alternatives), and parses each with the real parser
from ``lmforge.cli.build_parser`` without running it. It also checks that each
``make TARGET`` is a Makefile target and that each repository path the docs
name (``benchmarks/*.py``, ``recipes/*.toml``, ``tests/...``, source files,
relative links) exists, that each bare ``--flag`` in the prose is an option of
some subcommand or benchmark script, and that each ``--set key=value`` names a
real config field (fenced ``lmforge run`` commands pass the recipe's whole
check). It does not run the commands or check that their numbers are right:
that is the benchmarks' job.

Fenced commands must parse completely (required arguments included); an inline
span may be a fragment (``lmforge pretrain --data``), so only its subcommands
and option names are checked. ``...`` ends what is checked; ``<dir>``, ``FILE`` or
``N`` stand for a value of the right type (``lmforge <stage>`` checks only ``lmforge``).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from lmforge.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "zsh"}
OPS = {"|", "||", "&&", ";", "&"}
PLACEHOLDER = "__PLACEHOLDER__"
REDIRECTS = {">", ">>", "<", "2>", "2>>", "&>", ">&", "2>&1"}


@dataclass
class Snippet:
    file: str  # relative to the repository
    line: int
    text: str  # the command as written (continuations joined)
    inline: bool  # from an inline code span: a fragment is fine


# ---- extraction ---------------------------------------------------------------------------------

def _shell_lines(lines: list[str], start: int):
    """(line number, logical line) of a shell block, joining ``\\`` continuations."""
    buf, first = "", None
    for k, raw in enumerate(lines):
        if first is None:
            first = start + k
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        yield first, buf + raw
        buf, first = "", None
    if buf:
        yield first, buf


def _split_commands(line: str) -> list[list[str]]:
    """The simple commands of one shell line, without comments, prompts or redirections."""
    s = line.strip()
    if s.startswith("$ "):
        s = s[2:]
    # redirections (`> log`, `2>&1`, `2>/dev/null`, `&> out`) go before splitting, file name and all
    # (not a `<placeholder>`)
    s = re.sub(r"(?<!\S)(?:\d*>>?|&>|<(?![A-Za-z][\w.-]*>))(?:&\d+|\s*[^\s|&;<>]+)", " ", s)
    s = re.sub(r"<([A-Za-z][\w.-]*)>", "\x01\\1\x02", s)  # keep `<placeholder>` one word
    lex = shlex.shlex(s, posix=True, punctuation_chars="|&;<>")
    lex.whitespace_split = True
    lex.commenters = "#"
    try:
        tokens = list(lex)
    except ValueError:  # unbalanced quotes: let the caller see the raw words
        tokens = s.split()
    cmds, cur, skip_next = [], [], False
    for t in tokens:
        if skip_next:
            skip_next = False
            continue
        if t in OPS:
            cmds.append(cur)
            cur = []
        elif t in REDIRECTS or re.fullmatch(r"\d?[<>]{1,2}&?\d?", t):
            skip_next = not t.endswith(("&1", "&2"))
        else:
            cur.append(t)
    cmds.append(cur)
    return [[w.replace("\x01", "<").replace("\x02", ">") for w in c] for c in cmds if c]


def fenced_blocks(text: str):
    """(language, first line number, lines) of each fenced code block."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^\s*(```+|~~~+)\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(1), m.group(2).lower()
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        yield lang, i + 2, lines[i + 1:j]
        i = j + 1


def inline_spans(text: str):
    """(line number, content) of each inline code span outside fenced blocks."""
    in_fence = False
    for n, line in enumerate(text.splitlines(), 1):
        if re.match(r"^\s*(```|~~~)", line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        for m in re.finditer(r"(`+)(.+?)\1", line):
            yield n, m.group(2).strip()


def lmforge_snippets(path: Path, text: str | None = None) -> list[Snippet]:
    text = path.read_text(encoding="utf-8") if text is None else text
    rel = path.relative_to(ROOT).as_posix() if path.is_absolute() and ROOT in path.parents else str(path)
    out = []
    for lang, start, lines in fenced_blocks(text):
        if lang not in SHELL_LANGS:
            continue
        for n, line in _shell_lines(lines, start):
            for cmd in _split_commands(line):
                if cmd[0] == "lmforge":
                    out.append(Snippet(rel, n, shlex.join(cmd), inline=False))
    for n, span in inline_spans(text):
        # a table's `a\|b` lists alternatives, not a pipe: keep it through the shell split
        for cmd in _split_commands(span.replace("\\|", "\x00")):
            if cmd[0] == "lmforge":
                out.append(Snippet(rel, n, shlex.join(cmd).replace("\x00", "\\|"), inline=True))
    return out


def _expand(words: list[str]) -> list[list[str]]:
    """A table's ``train\\|encode`` (or ``train|encode``) is one command per alternative."""
    choices = [w.replace("\\|", "|").split("|") if "|" in w and not w.startswith("-") else [w] for w in words]
    return [list(c) for c in itertools.product(*choices)]


def _words(snippet: Snippet) -> list[list[str]]:
    try:
        words = shlex.split(snippet.text.replace("\\|", "\x00"))
    except ValueError:
        words = snippet.text.split()
    words = [w.replace("\x00", "\\|") for w in words]
    kept = []
    for w in words[1:]:
        if w == "...":
            break  # the rest is left out
        if re.fullmatch(r"<[A-Za-z][\w.-]*>", w):
            w = PLACEHOLDER  # `<dir>`: some value
        if re.fullmatch(r"\[[A-Z_ .|-]+\]", w):
            continue  # an optional positional in usage notation: [RECIPE]
        kept.append(w)
    return _expand(kept) if snippet.inline else [kept]


# ---- parsing ------------------------------------------------------------------------------------

def _walk(parser: argparse.ArgumentParser):
    """The parser and every subparser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in dict.fromkeys(action.choices.values()):
                yield from _walk(sp)


def _strict(parser: argparse.ArgumentParser, lenient: bool) -> argparse.ArgumentParser:
    """No abbreviated options (docs spell flags in full); with ``lenient``, nothing required."""
    for p in _walk(parser):
        p.allow_abbrev = False
        if lenient:
            for action in p._actions:
                action.required = False
    return parser


def parse_error(args: list[str], lenient: bool) -> str | None:
    """None if ``lmforge ARGS`` parses, else argparse's message."""
    parser = _strict(build_parser(), lenient)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(args)
    except SystemExit as e:
        if e.code in (0, None):  # --help, --version
            return None
        msg = [l for l in err.getvalue().splitlines() if l.strip()]
        return msg[-1] if msg else f"exit {e.code}"
    return None


def check_snippet(s: Snippet) -> list[str]:
    problems = []
    for args in _words(s):
        msg = parse_error(args, s.inline)
        for _ in range(len(args)):  # a placeholder (N, SECONDS, <n>) where a number goes stands for one
            m = re.search(r"invalid (?:int|float) value: '((?:[A-Z]|__)[A-Z0-9_]*)'", msg or "")
            if not m:
                break
            args = [("1" if w == m.group(1) else w) for w in args]
            msg = parse_error(args, s.inline)
        if msg and f"'{PLACEHOLDER}'" in msg:  # `<stage>` where a choice goes: check what precedes it
            args = args[:args.index(PLACEHOLDER)]
            msg = parse_error(args, True)
        if msg and s.inline and args and args[-1].startswith("-") and "expected" in msg:
            msg = parse_error(args + ["VALUE"], True)  # a fragment naming an option without its value
        if msg:
            problems.append(f"{s.file}:{s.line}: `{s.text}`: {msg}")
    return problems


# ---- the tests ----------------------------------------------------------------------------------

SNIPPETS = [s for p in DOCS for s in lmforge_snippets(p)]


def test_docs_have_commands():
    # the extractor finds both kinds (a test that finds nothing cannot fail)
    assert sum(not s.inline for s in SNIPPETS) >= 30, [s.text for s in SNIPPETS]
    assert sum(s.inline for s in SNIPPETS) >= 20, [s.text for s in SNIPPETS]
    files = {s.file for s in SNIPPETS}
    assert "README.md" in files and "docs/training.md" in files


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"{s.file}:{s.line}" for s in SNIPPETS])
def test_documented_command_parses(snippet):
    problems = check_snippet(snippet)
    assert not problems, "\n".join(problems)


def test_checker_catches_a_broken_line(tmp_path):
    doc = tmp_path / "broken.md"
    doc.write_text(
        "Text `lmforge pretrain --max-tim 5` here.\n\n"
        "```bash\n"
        "$ lmforge eval --checkpoint runs/pt --json | jq .loss   # fine\n"
        "lmforge pretrain --text my.txt \\\n"
        "    --checkpoint-evry 5 > log.txt\n"
        "lmforge serve --port 80\n"
        "lmforge tokenizer frobnicate -t x\n"
        "lmforge pretrain --text FILE --max-time SECONDS --max-steps many\n"
        "lmforge data stats runs/data --json 2>&1 > out.json 2> err.txt | head -1\n"
        "```\n", encoding="utf-8")
    snips = lmforge_snippets(doc)
    assert [(s.line, s.inline) for s in snips] == [(4, False), (5, False), (7, False), (8, False), (9, False),
                                                   (10, False), (1, True)]
    assert snips[5].text == "lmforge data stats runs/data --json"
    assert snips[0].text == "lmforge eval --checkpoint runs/pt --json"
    problems = {s.line: check_snippet(s) for s in snips}
    assert problems[4] == [] and problems[10] == []
    assert "unrecognized arguments: --checkpoint-evry 5" in problems[5][0] and ":5:" in problems[5][0]
    assert "the following arguments are required: --checkpoint" in problems[7][0]
    assert "invalid choice: 'frobnicate'" in problems[8][0]
    assert len(problems[9]) == 1 and "invalid int value: 'many'" in problems[9][0]  # SECONDS is a placeholder
    assert "--max-tim" in problems[1][0]
    # a table's alternatives are each checked; a fragment need not give required arguments
    ok = Snippet("x.md", 1, "lmforge serve\\|chat\\|generate", inline=True)
    bad = Snippet("x.md", 1, "lmforge data prepare\\|stat", inline=True)
    assert check_snippet(ok) == []
    for text in ("lmforge model info <preset> --seq-len <n> --json", "lmforge <stage> --help"):
        assert check_snippet(Snippet("x.md", 1, text, inline=False)) == [], text
    assert check_snippet(Snippet("x.md", 1, "lmforge model info <preset> --seq-len <n> --jsn", inline=False))
    assert len(check_snippet(bad)) == 1 and "stat" in check_snippet(bad)[0]


# ---- make targets and paths ---------------------------------------------------------------------

def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return {m.group(1) for m in re.finditer(r"^([\w.-]+)\s*:(?!=)", text, re.M)}


def _make_mentions(path: Path):
    """``make TARGET`` in inline code or at the start of a fenced shell command."""
    text = path.read_text(encoding="utf-8")
    for n, span in inline_spans(text):
        m = re.match(r"make\s+([a-z][\w-]*)", span)
        if m:
            yield n, m.group(1)
    for lang, start, lines in fenced_blocks(text):
        if lang in SHELL_LANGS:
            for n, line in _shell_lines(lines, start):
                for cmd in _split_commands(line):
                    if cmd[0] == "make" and len(cmd) > 1:
                        yield n, cmd[1]


def test_make_targets_exist():
    targets = _make_targets()
    assert {"demo", "test"} <= targets
    seen, missing = 0, []
    for p in DOCS:
        for n, t in _make_mentions(p):
            seen += 1
            if t not in targets:
                missing.append(f"{p.relative_to(ROOT)}:{n}: `make {t}`: no such Makefile target "
                               f"(targets: {', '.join(sorted(targets))})")
    assert seen >= 4
    assert not missing, "\n".join(missing)


PATH_RE = re.compile(
    r"(?<![\w./~-])((?:benchmarks|recipes|tests|docs|tools|src/lmforge|lmforge|"
    r"data|model|train|infer|tokenize|pipeline|evaluate)/[\w./-]*\w\.(?:py|toml|c|h|md|png))\b")


def _path_mentions(path: Path):
    text = path.read_text(encoding="utf-8")
    for n, line in enumerate(text.splitlines(), 1):
        for m in PATH_RE.finditer(line):
            yield n, m.group(1)
        for m in re.finditer(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", line):  # relative markdown links
            if not re.match(r"\w+://", m.group(1)):
                yield n, "./" + m.group(1)


def _resolve(doc: Path, p: str) -> list[Path]:
    if p.startswith("./"):
        return [doc.parent / p[2:]]
    if p.startswith("lmforge/"):
        return [ROOT / "src" / p]
    head = p.split("/")[0]
    cands = [ROOT / p]
    if head in {"data", "model", "train", "infer", "tokenize", "pipeline", "evaluate"}:
        cands.append(ROOT / "src/lmforge" / p)
    if head == "img":
        cands.append(ROOT / "docs" / p)
    return cands


def test_mentioned_paths_exist():
    seen, missing = 0, []
    for doc in DOCS:
        for n, p in _path_mentions(doc):
            if re.search(r"(^|/)[A-Z_]+\.\w+$", p):  # a placeholder: benchmarks/NAME.py
                continue
            seen += 1
            if not any(c.exists() for c in _resolve(doc, p)):
                missing.append(f"{doc.relative_to(ROOT)}:{n}: {p}: no such file")
    assert seen >= 20
    assert not missing, "\n".join(missing)


def test_python_commands_name_existing_scripts_and_options():
    missing, seen = [], 0
    for doc in DOCS:
        for lang, start, lines in fenced_blocks(doc.read_text(encoding="utf-8")):
            if lang not in SHELL_LANGS:
                continue
            for n, line in _shell_lines(lines, start):
                for cmd in _split_commands(line):
                    if cmd[0] in {"python", "python3"} and len(cmd) > 1 and cmd[1].endswith(".py"):
                        seen += 1
                        script = ROOT / cmd[1]
                        if not script.exists():
                            missing.append(f"{doc.relative_to(ROOT)}:{n}: {cmd[1]}: no such script")
                            continue
                        src = script.read_text(encoding="utf-8")
                        for w in cmd[2:]:  # each --option must be one the script's argparse defines
                            opt = w.split("=")[0]
                            if opt.startswith("--") and f'"{opt}"' not in src and f"'{opt}'" not in src:
                                missing.append(f"{doc.relative_to(ROOT)}:{n}: {cmd[1]} has no option {opt}")
    assert seen >= 1
    assert not missing, "\n".join(missing)


def _all_cli_options() -> set[str]:
    return {o for p in _walk(build_parser()) for a in p._actions for o in a.option_strings}


def test_inline_flags_exist():
    # a bare `--flag` in the prose must be an option of some lmforge subcommand, or of the
    # benchmark script it is documented for
    options = _all_cli_options()
    bench = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "benchmarks").glob("*.py"))
    seen, missing = 0, []
    for doc in DOCS:
        for n, span in inline_spans(doc.read_text(encoding="utf-8")):
            m = re.match(r"(--?[a-zA-Z][\w-]*)", span)
            if not m:
                continue
            seen += 1
            flag = m.group(1)
            if flag not in options and f'"{flag}"' not in bench and f"'{flag}'" not in bench:
                missing.append(f"{doc.relative_to(ROOT)}:{n}: `{span}`: {flag} is not an option of any "
                               "lmforge subcommand or benchmark script")
    assert seen >= 5
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("argv, want", [
    (["--checkpoint-every", "50", "--device", "cpu"], {"checkpoint_every": 50, "device": "cpu"}),
    ([], {"checkpoint_every": 0, "device": "auto"}),  # TrainConfig's defaults when the flags are absent
    (["--set", "checkpoint_every=7", "--device", "auto"], {"checkpoint_every": 7, "device": "auto"}),
])
def test_pretrain_flags_reach_the_train_config(monkeypatch, tmp_path, argv, want):
    # the flags docs/training.md and docs/pipeline.md name set the TrainConfig fields they say
    import lmforge.train as T
    from lmforge import cli

    seen = {}
    monkeypatch.setattr(T, "train", lambda cfg, quiet=False: seen.setdefault("cfg", cfg) and {})
    text = tmp_path / "t.txt"
    text.write_text("x", encoding="utf-8")
    assert cli.main(["pretrain", "--text", str(text), "--max-steps", "1", "--out", str(tmp_path / "r"), *argv]) == 0
    assert {k: getattr(seen["cfg"], k) for k in want} == want
    with pytest.raises(SystemExit):  # argparse rejects a non-integer period
        build_parser().parse_args(["pretrain", "--checkpoint-every", "often"])


# ---- --set keys -------------------------------------------------------------------------------

def _set_roots():
    """Which config a subcommand's --set keys name (model.* of pretrain: ModelConfig)."""
    from lmforge.data.prepare import PrepareConfig
    from lmforge.model import ModelConfig
    from lmforge.pipeline.recipe import Recipe
    from lmforge.align.sft import SFTConfig
    from lmforge.train import TrainConfig

    return {("pretrain",): TrainConfig, ("sft",): SFTConfig, ("data", "prepare"): PrepareConfig,
            ("run",): Recipe}, ModelConfig


def _field_problem(cls, dotted: str, model_cls) -> str | None:
    """None if ``dotted`` names a field of dataclass ``cls`` (TrainConfig's ``model.*``: ModelConfig)."""
    import dataclasses
    import typing

    target = cls
    parts = dotted.split(".")
    if parts[0] == "model" and cls.__name__ == "TrainConfig" and len(parts) > 1:
        from lmforge.model.config import field_names

        return None if ".".join(parts[1:]) in field_names() else f"ModelConfig has no field {dotted[6:]!r}"
    for i, p in enumerate(parts):
        if target is dict and i == 1 and parts[0] == "model":
            target = model_cls
        if not (isinstance(target, type) and dataclasses.is_dataclass(target)):
            return f"{'.'.join(parts[:i])} is not a table"
        hints = typing.get_type_hints(target)
        if p not in hints:
            return f"{cls.__name__} has no field {dotted!r}"
        target = hints[p]
    return None


def test_set_key_check_can_fail():
    roots, model_cls = _set_roots()
    train, prepare, recipe = roots[("pretrain",)], roots[("data", "prepare")], roots[("run",)]
    assert _field_problem(train, "checkpoint_every", model_cls) is None
    assert _field_problem(train, "model.n_layer", model_cls) is None
    assert _field_problem(prepare, "filters.c4", model_cls) is None
    assert _field_problem(recipe, "train.max_tokens", model_cls) is None
    assert "no field 'checkpoint_evry'" in _field_problem(train, "checkpoint_evry", model_cls)
    assert _field_problem(train, "model.n_layr", model_cls)
    assert _field_problem(prepare, "filters.c5", model_cls)
    assert _field_problem(recipe, "train.max_tokns", model_cls)


def _set_items(words: list[str]) -> list[tuple[str, str]]:
    items = []
    for i, w in enumerate(words):
        if w in ("--set", "-s") and i + 1 < len(words) and "=" in words[i + 1]:
            k, v = words[i + 1].split("=", 1)
            items.append((k, v))
    return items


def _is_placeholder(s: str) -> bool:
    # a shell variable (`$seed`, `${h}`) is a placeholder too: the loop around the command fills it in
    return (s in ("", "key", "KEY", "VALUE", "value", "...") or bool(re.fullmatch(r"[A-Z][A-Z0-9_]*", s))
            or "$" in s)


def test_documented_set_keys_exist(monkeypatch):
    # `--set key=value` in a documented command names a real field of the config that command
    # takes; a fenced `lmforge run` also passes the recipe's whole check (load_recipe), and a
    # fenced pretrain/prepare command's values coerce to the fields' types
    from lmforge._config import apply_overrides

    roots, model_cls = _set_roots()
    monkeypatch.chdir(ROOT)
    seen, problems = 0, []
    for s in SNIPPETS:
        for words in _words(s):
            path = tuple(w for w in words[:2] if not w.startswith("-"))
            cls = roots.get(path[:1]) or roots.get(path[:2])
            items = [(k, v) for k, v in _set_items(words) if not _is_placeholder(k)]
            if cls is None or not items:
                continue
            for k, v in items:
                seen += 1
                msg = _field_problem(cls, k, model_cls)
                if msg:
                    problems.append(f"{s.file}:{s.line}: `{s.text}`: --set {k}: {msg}")
            if s.inline or any(_is_placeholder(v) for _, v in items):
                continue
            try:
                if path[:1] == ("run",):
                    from lmforge.pipeline import load_recipe

                    recipe = next((w for w in words[1:] if not w.startswith("-") and
                                   words[words.index(w) - 1] not in ("--set", "-s", "--from", "--name", "--runs")),
                                  None)
                    load_recipe(recipe, [f"{k}={v}" for k, v in items])
                else:
                    apply_overrides(cls(), [f"{k}={v}" for k, v in items if not k.startswith("model.")])
            except (ValueError, TypeError, FileNotFoundError) as e:
                problems.append(f"{s.file}:{s.line}: `{s.text}`: {e}")
    assert seen >= 5
    assert not problems, "\n".join(problems)


def test_prose_set_keys_exist():
    # a bare `--set key=value` in the prose names a field of TrainConfig (model.*: ModelConfig),
    # PrepareConfig or a recipe
    roots, model_cls = _set_roots()
    seen, problems = 0, []
    for doc in DOCS:
        for n, span in inline_spans(doc.read_text(encoding="utf-8")):
            if not re.match(r"--set\s", span):
                continue
            words = span.split()
            for w in words[1:]:  # `--set ema=0.99 ema_start=0.7` is shorthand for two
                k = w.split("=", 1)[0]
                if "=" not in w or _is_placeholder(k):
                    continue
                seen += 1
                if all(_field_problem(c, k, model_cls) for c in roots.values()):
                    problems.append(f"{doc.relative_to(ROOT)}:{n}: `{span}`: {k} is not a field of "
                                    "TrainConfig, ModelConfig (model.*), PrepareConfig or a recipe")
    assert seen >= 5
    assert not problems, "\n".join(problems)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    h = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", h).replace(" ", "-")


def test_link_anchors_exist():
    seen, missing = 0, []
    for doc in DOCS:
        for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            for m in re.finditer(r"\]\(([^)\s#]*)#([^)\s]+)\)", line):
                target = (doc.parent / m.group(1)) if m.group(1) else doc
                if re.match(r"\w+://", m.group(1)) or not target.exists():
                    continue  # other sites; a missing file is test_mentioned_paths_exist's
                seen += 1
                text = target.read_text(encoding="utf-8")
                slugs = {_slug(h) for h in re.findall(r"^#+\s+(.+)$", text, re.M)}
                if m.group(2) not in slugs:
                    missing.append(f"{doc.relative_to(ROOT)}:{n}: #{m.group(2)}: no such heading in "
                                   f"{target.relative_to(ROOT)}")
    assert seen >= 3
    assert not missing, "\n".join(missing)


def _resolves(dotted: str) -> bool:
    import importlib

    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for p in parts[i:]:
                obj = getattr(obj, p)
        except AttributeError:
            return False
        return True
    return False


def test_documented_python_names_exist():
    # `lmforge.model.load`, `lmforge.train.optim.AdamW`, ... in the prose name real objects
    seen, missing = 0, []
    for doc in DOCS:
        for n, span in inline_spans(doc.read_text(encoding="utf-8")):
            for m in re.finditer(r"\blmforge(?:\.[A-Za-z_]\w*)+", span):
                seen += 1
                if not _resolves(m.group(0)):
                    missing.append(f"{doc.relative_to(ROOT)}:{n}: {m.group(0)}: no such module or attribute")
    assert seen >= 3
    assert not _resolves("lmforge.model.no_such_thing")
    assert not missing, "\n".join(missing)
