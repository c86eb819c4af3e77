"""A task as data: its definition, its documents per split, and the requests it asks of a model.

Knows lmforge's task format, which is lm-evaluation-harness's task YAML for the keys it reads
(``doc_to_text`` / ``doc_to_target`` / ``doc_to_choice`` as Jinja2 templates with StrictUndefined
or bare field names, ``target_delimiter``, ``fewshot_delimiter``, ``description``, ``gen_prefix``,
``num_fewshot``, ``fewshot_split``, ``generation_kwargs``, ``repeats``, ``filter_list``,
``metric_list``; documents from local JSON / JSONL ``data_files``) plus a few lmforge keys
(``generator`` for built-in documents, ``docs`` as a shorthand for data files, ``random_baseline``,
``primary_metric``, ``code`` for pass@k: where the program's parts are and the sandbox's limits,
``bootstrap_unit``: the document field(s) naming a cluster of correlated documents, which the
harness's bootstrap resamples whole), and a JSONL task file (line 1 the definition, every
further line a document with a ``split``). Prompts are built as lm-eval builds them (its
``ConfigurableTask.fewshot_context`` / ``build_qa_turn`` / ``construct_requests`` and its
default sampler: one ``random.Random(1234)`` drawing each document's examples in document order),
so the same task gives the same request strings in both.

Known differences from lm-eval: no Hub datasets (only local JSON / JSONL), no ``!function``
(Python from task files), no ``group`` files; under a chat template only lm-eval's single-turn
form (no ``fewshot_as_multiturn``, no ``gen_prefix``); a pass@k task without ``filter_list`` keeps
every sample (lm-eval's default filter keeps the first), and with ``repeats`` > 1 sample i carries
``seed: i`` in its gen_kwargs (lm-eval sends identical requests); an evaluated document is kept
out of its own few-shot examples whenever the few-shot split is the split evaluated (lm-eval
does so only when it is the configured ``test_split``); a bare identifier that is not a field
is an error here (lm-eval would use it as a literal string); data files are looked up beside the task
file first, then (as lm-eval does) in the working directory.

Knows nothing of models or scores: ``harness`` sends the requests and ``metrics`` scores them.
"""
from __future__ import annotations

import ast
import difflib
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import metrics as M
from .lm import Request

__all__ = ["Task", "TaskError", "DocRequests", "load_task", "load_tasks", "builtin_task_dir",
           "OUTPUT_TYPES", "FEWSHOT_SEED"]

OUTPUT_TYPES = ("multiple_choice", "loglikelihood_rolling", "generate_until", "loglikelihood")
FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default
_DEFAULT_METRICS = {  # lm-eval's DEFAULT_METRIC_REGISTRY
    "multiple_choice": ["acc"], "loglikelihood": ["perplexity", "acc"],
    "loglikelihood_rolling": ["word_perplexity", "byte_perplexity", "bits_per_byte"],
    "generate_until": ["exact_match"],
}
# keys of lm-eval's TaskConfig (read or tolerated) and lmforge's own
_LMEVAL_KEYS = {
    "task", "task_alias", "tag", "dataset_path", "dataset_name", "dataset_kwargs", "training_split",
    "validation_split", "test_split", "fewshot_split", "process_docs", "doc_to_text", "doc_to_target",
    "doc_to_choice", "doc_to_image", "doc_to_audio", "unsafe_code", "process_results", "use_prompt",
    "description", "target_delimiter", "fewshot_delimiter", "fewshot_config", "num_fewshot",
    "metric_list", "output_type", "generation_kwargs", "repeats", "filter_list", "should_decontaminate",
    "doc_to_decontamination_query", "gen_prefix", "metadata", "include", "custom_dataset",
}
_LMFORGE_KEYS = {"generator", "generator_kwargs", "docs", "random_baseline", "primary_metric", "code", "bootstrap_unit"}
# ``code`` keys: where the program's parts are, and the sandbox's limits (``sandbox.Limits`` fields;
# ``timeout_s`` is the wall-clock limit, and the CPU limit unless ``cpu_s`` is given)
CODE_FIELDS = ("test_field", "entry_point_field", "prompt_field")
CODE_LIMITS = ("timeout_s", "wall_s", "cpu_s", "memory_mb", "fsize_mb", "nproc", "nofile", "output_bytes")
_UNSUPPORTED = {  # keys whose meaning lmforge cannot honour: an error, not a silent difference
    "process_docs": "Python document processing (!function)", "process_results": "Python scoring",
    "custom_dataset": "a Python dataset", "use_prompt": "promptsource prompts",
    "doc_to_image": "images", "doc_to_audio": "audio",
}
_EXACT_OPTS = set(M.EXACT_MATCH_OPTIONS)
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class TaskError(ValueError):
    """A bad task file or document; the message names the file (and line), the field and the value."""


class _Function:
    """A ``!function`` tag in a YAML file (Python from a task file: not supported)."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"!function {self.name}"


def _yaml_load(path: Path):
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TaskError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    try:
        return yaml.load(text, Loader=Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise TaskError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None


def _env():
    import jinja2

    env = jinja2.Environment(loader=jinja2.BaseLoader(), undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["regex_replace"] = lambda s, pattern, repl, count=0: re.sub(pattern, repl, s, count=count)
    return env


_ENV = None
_TEMPLATES: dict[str, Any] = {}


def _template(src: str):
    global _ENV
    t = _TEMPLATES.get(src)
    if t is None:
        if _ENV is None:
            _ENV = _env()
        t = _TEMPLATES[src] = _ENV.from_string(src)
    return t


def _near(name, names) -> str:
    m = difflib.get_close_matches(str(name), list(names), n=1, cutoff=0.5)
    return f" (did you mean {m[0]!r}?)" if m else ""


@dataclass
class DocRequests:
    """One document's prompt and requests, and what scoring needs of it."""
    doc_id: int
    doc: dict
    prompt: str  # the context sent (for rolling tasks: the scored text)
    target: Any  # gold: choice index (or list) for multiple choice; string (or list) for generation
    choices: list | None
    requests: list  # of lm.Request
    where: str = ""  # file:line of the document, when it came from a file


@dataclass
class Task:
    """A task definition and its documents per split (loaded on first use, then validated)."""
    name: str
    output_type: str
    config: dict
    source: str = ""  # the file the definition came from
    base_dir: str = "."
    doc_to_text: Any = None
    doc_to_target: Any = None
    doc_to_choice: Any = None
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    gen_prefix: str | None = None
    test_split: str | None = None
    validation_split: str | None = None
    training_split: str | None = None
    fewshot_split: str | None = None
    fewshot_sampler: str = "default"
    fewshot_samples: list | None = None
    num_fewshot: int = 0
    generation_kwargs: dict | None = None
    repeats: int = 1
    filters: list = field(default_factory=list)  # [(name, [(function, kwargs), ...])]
    metrics: list = field(default_factory=list)  # [(metric, kwargs)]
    primary_metric: str = ""
    random_baseline: float | None = None
    code: dict | None = None
    bootstrap_unit: tuple | None = None  # document fields whose values name a cluster the bootstrap resamples
    skip_bad: bool = False
    inline_docs: dict | None = None  # split -> [(line, doc)] for a JSONL task file
    skipped: dict = field(default_factory=dict)  # split -> documents skipped as bad
    _docs: dict = field(default_factory=dict, repr=False)
    _where: dict = field(default_factory=dict, repr=False)
    _data_dir: Any = field(default=None, repr=False)

    # ------------------------------------------------------------------ documents
    def _err(self, msg: str, where: str | None = None) -> TaskError:
        return TaskError(f"{where or self.source or self.name}: task {self.name!r}: {msg}")

    def split_for(self, which: str) -> str:
        """The split name for ``"test"`` (the reported split), ``"dev"`` (the validation split) or a split name."""
        if which == "test":
            s = self.test_split or self.validation_split
            if s is None:
                raise self._err("no test_split (or validation_split) to evaluate")
            return s
        if which == "dev":
            if self.validation_split is None:
                raise self._err("no validation_split (the dev split) to evaluate; set validation_split")
            return self.validation_split
        return which

    def docs(self, split: str, data_dir=None) -> list[dict]:
        """The documents of ``split`` (a split name), loaded and validated on first use."""
        key = (split, str(data_dir) if data_dir is not None else None)
        if key not in self._docs:
            raw = self._load_split(split, data_dir)
            good, where, skipped = [], [], 0
            for w, doc in raw:
                if isinstance(doc, TaskError):  # a malformed line, already counted as skippable
                    skipped += 1
                    continue
                try:
                    self._check_doc(doc, w)
                except TaskError:
                    if not self.skip_bad:
                        raise
                    skipped += 1
                    continue
                good.append(doc)
                where.append(w)
            if not good and raw:
                raise self._err(f"split {split!r}: every document was bad ({skipped} skipped)")
            self._docs[key], self._where[key] = good, where
            self.skipped[split] = skipped
        return self._docs[key]

    def doc_where(self, split: str, i: int, data_dir=None) -> str:
        key = (split, str(data_dir) if data_dir is not None else None)
        w = self._where.get(key)
        return w[i] if w and i < len(w) else f"{self.source}: {split}[{i}]"

    def _load_split(self, split: str, data_dir) -> list:
        cfg = self.config
        if self.inline_docs is not None:
            if split not in self.inline_docs:
                raise self._err(f"no documents with split {split!r} (splits: {sorted(self.inline_docs)})")
            return self.inline_docs[split]
        if "generator" in cfg:
            from . import builtin  # another helper's module; imported when a generator task runs
            kwargs = dict(cfg.get("generator_kwargs") or {})
            try:
                docs = builtin.generate(cfg["generator"], split, data_dir=data_dir, **kwargs)
            except TaskError:
                raise
            except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
                raise self._err(f"generator {cfg['generator']!r} split {split!r}: {e}") from e
            return [(f"{self.source}: generator {cfg['generator']} {split}[{i}]", d) for i, d in enumerate(docs)]
        files = self._data_files()
        if split not in files:
            raise self._err(f"no data file for split {split!r} (data_files splits: {sorted(files)})")
        out = []
        for f in files[split]:
            out.extend(_read_docs(Path(f), self.skip_bad, field=(cfg.get("dataset_kwargs") or {}).get("field")))
        _fill_missing(out)
        return out

    def _data_files(self) -> dict[str, list[str]]:
        cfg = self.config
        base = Path(self.base_dir)
        if "docs" in cfg:
            spec = cfg["docs"]
        else:
            spec = (cfg.get("dataset_kwargs") or {}).get("data_files")
        if isinstance(spec, (str, list)):
            spec = {"train": spec}  # as HF datasets: bare data_files are the train split
        out = {}
        for split, fs in (spec or {}).items():
            fs = [fs] if isinstance(fs, str) else list(fs)
            # relative to the task file (lmforge); else to the working directory, where lm-eval looks
            out[str(split)] = [_locate(base, p) for p in fs]
        return out

    def splits(self) -> list[str]:
        if self.inline_docs is not None:
            return sorted(self.inline_docs)
        if "generator" in self.config:
            return ["train", "dev", "private"]
        return sorted(self._data_files())

    # ------------------------------------------------------------------ fields of one document
    def _resolve(self, spec, doc, what: str, where: str):
        """lm-eval's resolution: a field name gives the field, any other string renders as a template."""
        if isinstance(spec, str) and spec in doc:
            return doc[spec], True
        if isinstance(spec, str):
            import jinja2
            if what in ("doc_to_text", "doc_to_target", "doc_to_choice") and _IDENT.match(spec):
                raise self._err(f"{what}: {spec!r} is not a field of the document (fields: {', '.join(sorted(doc))})"
                                f"{_near(spec, doc)}; for a literal text write {{{{ {spec!r} }}}}", where)
            try:
                return _template(spec).render(**doc), False
            except jinja2.UndefinedError as e:
                raise self._err(f"{what}: template {spec!r} references an unknown field ({e.message}); "
                                f"the document's fields: {', '.join(sorted(doc))}", where) from None
            except jinja2.TemplateError as e:
                raise self._err(f"{what}: template {spec!r} failed: {e}", where) from None
        return spec, False

    def text(self, doc, where: str = ""):
        """``doc_to_text`` of a document: a string (an int for lm-eval's multiple-input tasks)."""
        spec = self.doc_to_text
        if spec is None:
            return ""
        if isinstance(spec, int):
            return spec
        v, is_field = self._resolve(spec, doc, "doc_to_text", where)
        if not is_field and isinstance(v, str) and v.isdigit() and self.doc_to_choice is not None:
            return ast.literal_eval(v)
        return v

    def target(self, doc, where: str = ""):
        """``doc_to_target`` of a document (an int, a string or a list), as lm-eval returns it."""
        spec = self.doc_to_target
        if spec is None:
            return None
        if isinstance(spec, (int, list)):
            return spec
        v, is_field = self._resolve(spec, doc, "doc_to_target", where)
        if is_field or not isinstance(v, str):
            return v
        if v.isdigit() and self.doc_to_choice is not None:
            return ast.literal_eval(v)
        if len(v) >= 2 and v[0] == "[" and v[-1] == "]":
            try:
                return ast.literal_eval(v)
            except (SyntaxError, ValueError):
                return v
        return v

    def choices(self, doc, where: str = "") -> list | None:
        spec = self.doc_to_choice
        if spec is None:
            return None
        if isinstance(spec, list):
            return spec
        if isinstance(spec, dict):
            return list(spec.values())
        v, is_field = self._resolve(spec, doc, "doc_to_choice", where)
        if is_field:
            return v
        try:
            return ast.literal_eval(v)
        except (SyntaxError, ValueError):
            raise self._err(f"doc_to_choice: template {spec!r} rendered {v[:80]!r}, not a list literal", where) from None

    def unit(self, doc):
        """The bootstrap cluster of a document: its ``bootstrap_unit`` field values (None: no clusters)."""
        if self.bootstrap_unit is None:
            return None
        return json.dumps([doc.get(f) for f in self.bootstrap_unit], sort_keys=True, default=str)

    def rolling_text(self, doc, where: str = "") -> str:
        """The text a rolling task scores: ``doc_to_target`` as lm-eval does, else ``doc_to_text``."""
        v = self.target(doc, where) if self.doc_to_target is not None else self.text(doc, where)
        return v if isinstance(v, str) else str(v)

    def decontamination_text(self, doc) -> str:
        spec = self.config.get("doc_to_decontamination_query")
        if spec is not None:
            v, _ = self._resolve(spec, doc, "doc_to_decontamination_query", "")
            return str(v)
        if self.output_type == "loglikelihood_rolling":
            return self.rolling_text(doc)
        return str(self.text(doc))

    def gold(self, doc, where: str = ""):
        """The reference: a choice index (or list of them) for multiple choice; the string (or
        strings) for generation; the continuation for loglikelihood."""
        t = self.target(doc, where)
        ch = self.choices(doc, where)
        if self.output_type == "multiple_choice":
            golds = t if isinstance(t, list) else [t]
            out = []
            for g in golds:
                if isinstance(g, bool) or not isinstance(g, (int, str)):
                    raise self._err(f"doc_to_target: {g!r} is neither a choice index nor a choice's text", where)
                if isinstance(g, str):
                    if g not in ch:
                        raise self._err(f"doc_to_target: target {g!r} is not among the choices {ch!r}", where)
                    g = ch.index(g)
                elif not 0 <= g < len(ch):
                    raise self._err(f"doc_to_target: target index {g} is outside the {len(ch)} choices {ch!r}", where)
                out.append(g)
            return out if isinstance(t, list) else out[0]
        if self.output_type == "generate_until" and ch is not None and isinstance(t, int):
            if not 0 <= t < len(ch):
                raise self._err(f"doc_to_target: target index {t} is outside the {len(ch)} choices", where)
            return ch[t]
        if isinstance(t, list):
            return [str(x) for x in t]
        return None if t is None else str(t)

    def _check_doc(self, doc, where: str):
        if not isinstance(doc, dict):
            raise self._err(f"a document must be a JSON object, got {type(doc).__name__}", where)
        for f in self.bootstrap_unit or ():
            if doc.get(f) is None:  # (a column absent from this document reads as None)
                raise self._err(f"bootstrap_unit: field {f!r} missing (or null) in the document (fields: "
                                f"{', '.join(sorted(doc))}){_near(f, doc)}", where)
        if self.output_type == "loglikelihood_rolling":
            self.rolling_text(doc, where)
            return
        q = self.text(doc, where)
        if isinstance(q, int) and not isinstance(q, bool) and self.output_type == "multiple_choice":
            # multiple input: doc_to_text is the index of the right context among doc_to_choice's contexts
            ch = self.choices(doc, where)
            if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) for c in ch):
                raise self._err(f"doc_to_choice: expected a list of at least 2 contexts, got {ch!r}", where)
            if not 0 <= q < len(ch):
                raise self._err(f"doc_to_text: index {q} of the right context is outside the {len(ch)} choices", where)
            t = self.target(doc, where)
            if t is None or isinstance(t, (list, dict)):
                raise self._err(f"doc_to_target: expected the continuation (a string), got {t!r}", where)
            return
        if not isinstance(q, str):
            raise self._err(f"doc_to_text: expected a string, got {type(q).__name__} {q!r}", where)
        if self.output_type == "multiple_choice":
            ch = self.choices(doc, where)
            if not isinstance(ch, list) or not all(isinstance(c, str) for c in ch):
                raise self._err(f"doc_to_choice: expected a list of strings, got {ch!r}", where)
            if len(ch) < 2:
                raise self._err(f"doc_to_choice: a choice list of {len(ch)} ({ch!r}); multiple choice needs at least 2", where)
        elif self.doc_to_choice is not None:
            self.choices(doc, where)
        if self.doc_to_target is None and self.output_type != "loglikelihood_rolling":
            raise self._err("doc_to_target: missing (required)", self.source)
        g = self.gold(doc, where)
        if g is None or (g == "" and self.output_type == "multiple_choice"):
            raise self._err(f"doc_to_target: empty target for document {doc!r}"[:200], where)
        if self.code is not None:
            for k in ("test_field",):
                f = self.code.get(k, "test")
                if f not in doc:
                    raise self._err(f"code.{k}: field {f!r} missing from the document (fields: {', '.join(sorted(doc))})", where)

    # ------------------------------------------------------------------ prompts and requests
    def _answer_text(self, a, c) -> str:
        if c and isinstance(a, int) and not isinstance(a, bool):
            a = c[a]
        elif isinstance(a, list):
            a = a[0]
        return a if isinstance(a, str) else str(a)

    def _qa_turn(self, q: str, c=None, a=None, gen_prefix=None, tgt_delim=" ", few_delim="\n\n") -> list:
        """lm-eval's ``build_qa_turn``: ``[[role, content, delimiter], ...]`` (the user's question, and the
        assistant's answer or generation prefix)."""
        has_answer = a is not None and a != ""
        if has_answer and not gen_prefix:
            user = [["user", q, tgt_delim]]
        elif gen_prefix and _requires_delimiter(q, gen_prefix):
            user = [["user", q, tgt_delim]]
        else:
            user = [["user", q, ""]]
        if has_answer:
            return user + [["assistant", _maybe_delimit(gen_prefix, self._answer_text(a, c), " "), few_delim]]
        if gen_prefix:
            return user + [["assistant", gen_prefix, ""]]
        return user

    def messages(self, doc, fewshot_docs: list[dict], where: str = "", question=None) -> list:
        """The prompt of ``doc`` after ``fewshot_docs`` (already drawn) as lm-eval's messages: the
        description (as the system message), examples, question (``question``: in place of the
        document's own text, for lm-eval's multiple-input tasks)."""
        msgs = []
        if self.description:
            v, _ = self._resolve(self.description, doc, "description", where)
            if str(v):
                msgs.append(["system", str(v), ""])
        gen_prefix = None
        if self.gen_prefix:
            gen_prefix = str(self._resolve(self.gen_prefix, doc, "gen_prefix", where)[0])
        for fs in fewshot_docs:
            fs_prefix = str(self._resolve(self.gen_prefix, fs, "gen_prefix", where)[0]) if self.gen_prefix else None
            q = self.text(fs)
            c = self.choices(fs) if self.doc_to_choice is not None else None
            if isinstance(q, int) and c is not None:  # multiple input: the example's right context, then its target
                q, c = c[q], None
            msgs += self._qa_turn(q, c, self.target(fs), fs_prefix, self.target_delimiter, self.fewshot_delimiter)
        if question is None:
            msgs += self._qa_turn(self.text(doc, where), None, None, gen_prefix, self.target_delimiter, "")
        else:
            msgs += self._qa_turn(question, None, None, gen_prefix, "", "")
        return msgs

    def context(self, doc, fewshot_docs: list[dict], where: str = "", question=None, chat=None) -> str:
        """The prompt as text: the messages joined (each followed by its delimiter), or, with ``chat``
        (``messages -> str``, e.g. ``LM.apply_chat_template``), collapsed into one user turn after the
        system message and rendered by it, as lm-eval does with ``--apply_chat_template``."""
        msgs = self.messages(doc, fewshot_docs, where, question)
        if chat is None:
            return "".join(m[1] + m[2] for m in msgs)
        if msgs[-1][0] == "assistant":
            raise self._err("gen_prefix with a chat template (an assistant turn to continue) is not supported")
        system = [msgs.pop(0)] if msgs[0][0] == "system" else []
        msgs[-1][2] = ""
        out = [{"role": "system", "content": m[1]} for m in system]
        out.append({"role": "user", "content": "".join(m[1] + m[2] for m in msgs)})
        return chat(out)

    def _fewshot_pool(self, data_dir) -> tuple[list[dict], str | None]:
        if self.fewshot_samples is not None:
            return list(self.fewshot_samples), None
        split = self.fewshot_split or self.training_split or self.validation_split or self.test_split
        if split is None:
            raise self._err("num_fewshot > 0 but no fewshot_split (or training/validation split) to draw from")
        return list(self.docs(split, data_dir)), split

    def requests(self, split: str, *, limit=None, num_fewshot: int | None = None, data_dir=None,
                 fewshot_seed: int = FEWSHOT_SEED, chat=None) -> list[DocRequests]:
        """Every document of ``split`` (the first ``limit``; a float < 1 is a fraction) as lm-eval
        builds its requests: multiple choice -> one loglikelihood (context, target_delimiter +
        choice) per choice; loglikelihood -> (context, target) (no delimiter, as lm-eval);
        loglikelihood_rolling -> (text,); generate_until -> (context, gen_kwargs) x repeats, sample
        i with seed i. ``chat``: render each prompt with this chat template (``messages -> str``);
        the target delimiter of a choice is then empty (lm-eval's rule without a gen_prefix)."""
        docs = self.docs(split, data_dir)
        if limit is not None:
            n = int(len(docs) * limit) if isinstance(limit, float) and limit < 1.0 else int(limit)
            docs = docs[:max(0, n)]
        k = self.num_fewshot if num_fewshot is None else int(num_fewshot)
        pool, pool_split = ([], None)
        if k > 0 and self.output_type != "loglikelihood_rolling":
            pool, pool_split = self._fewshot_pool(data_dir)
        rnd = random.Random(fewshot_seed)
        delim = self.target_delimiter
        if chat is not None:  # lm-eval: under a chat template the choice follows the assistant's turn directly
            delim = self.target_delimiter if self.gen_prefix and not self.gen_prefix[-1:].isspace() else ""
        exclude = pool_split is not None and pool_split == split
        out = []
        for i, doc in enumerate(docs):
            where = self.doc_where(split, i, data_dir)
            if self.output_type == "loglikelihood_rolling":
                text = self.rolling_text(doc, where)
                out.append(DocRequests(i, doc, text, None, None,
                                       [Request("loglikelihood_rolling", (text,), self.name, i, 0)], where))
                continue
            shots = self._draw(rnd, pool, k, doc if exclude else None) if k > 0 else []
            if self.output_type == "multiple_choice" and isinstance(self.text(doc, where), int):
                ctx = gold = None
            else:
                ctx = self.context(doc, shots, where, chat=chat)
                gold = self.gold(doc, where)
            if self.output_type == "multiple_choice" and isinstance(self.text(doc, where), int):
                # lm-eval's multiple input (Winogrande's form): one context per choice, the same continuation
                ch = self.choices(doc, where)
                cont = self.target(doc, where)
                cont = cont if isinstance(cont, str) else str(cont)
                ctxs = [self.context(doc, shots, where, question=c, chat=chat) for c in ch]
                reqs = [Request("loglikelihood", (cx, f"{delim}{cont}"), self.name, i, j)
                        for j, cx in enumerate(ctxs)]
                out.append(DocRequests(i, doc, ctxs[self.text(doc, where)], self.text(doc, where), ch, reqs, where))
                continue
            if self.output_type == "multiple_choice":
                ch = self.choices(doc, where)
                reqs = [Request("loglikelihood", (ctx, f"{delim}{c}"), self.name, i, j)
                        for j, c in enumerate(ch)]
                out.append(DocRequests(i, doc, ctx, gold, ch, reqs, where))
            elif self.output_type == "loglikelihood":
                t = self.target(doc, where)
                reqs = [Request("loglikelihood", (ctx, t if isinstance(t, str) else str(t)), self.name, i, 0)]
                out.append(DocRequests(i, doc, ctx, gold, None, reqs, where))
            else:
                reqs = []
                for r in range(self.repeats):
                    gk = dict(self.generation_kwargs or {})
                    gk["until"] = list(gk.get("until") or [])
                    if self.repeats > 1:
                        gk["seed"] = r
                    reqs.append(Request("generate_until", (ctx, gk), self.name, i, r))
                out.append(DocRequests(i, doc, ctx, gold, self.choices(doc, where), reqs, where))
        return out

    def _draw(self, rnd: random.Random, pool: list[dict], n: int, eval_doc) -> list[dict]:
        """lm-eval's ContextSampler.sample (default) or FirstNSampler (first_n)."""
        if self.fewshot_sampler == "first_n":
            p = [x for x in pool if x != eval_doc] if eval_doc is not None else pool
            if n > len(p):
                raise self._err(f"num_fewshot {n} exceeds the {len(p)} few-shot documents")
            return p[:n]
        need = n + (1 if eval_doc is not None else 0)
        if need > len(pool):
            raise self._err(f"num_fewshot {n} exceeds the {len(pool)} few-shot documents available")
        if eval_doc is None:
            return rnd.sample(pool, n)
        res = [x for x in rnd.sample(pool, n + 1) if x != eval_doc][:n]
        if len(res) < n:
            res = rnd.sample([x for x in pool if x != eval_doc], n)
        return res


def _locate(base: Path, p) -> str:
    p = Path(p)
    if p.is_absolute() or (base / p).exists() or not p.exists():
        return str(p if p.is_absolute() else base / p)
    return str(p.resolve())


def _maybe_delimit(prefix, suffix, delimiter=" ") -> str:
    if not prefix:
        return suffix or ""
    if not suffix:
        return prefix or ""
    return prefix + delimiter + suffix if not (prefix[-1].isspace() or suffix[0].isspace()) else prefix + suffix


def _requires_delimiter(prefix: str, suffix: str) -> bool:
    if prefix == "":
        return False
    return not (prefix[-1].isspace() or suffix[0].isspace())


def _fill_missing(rows: list):
    """As HF datasets does, every document of a split has every column (None where absent)."""
    keys: dict = {}
    for _, d in rows:
        if isinstance(d, dict):
            keys.update(dict.fromkeys(d))
    for _, d in rows:
        if isinstance(d, dict):
            for k in keys:
                d.setdefault(k, None)


def _read_docs(path: Path, skip_bad: bool, field: str | None = None) -> list:
    """``[(where, doc)]`` from a JSON array / object file or a JSONL file; a malformed line raises
    (file:line) or, with ``skip_bad``, becomes a TaskError placeholder that is counted as skipped."""
    if not path.is_file():
        raise TaskError(f"{path}: data file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TaskError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    stripped = text.lstrip()
    if stripped[:1] in ("[", "{") and not path.suffix == ".jsonl":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            obj = None  # perhaps JSON lines in a .json file
        if isinstance(obj, list):
            return [(f"{path}[{i}]", d) for i, d in enumerate(obj)]
        if isinstance(obj, dict):
            if field is not None:
                if field not in obj:
                    raise TaskError(f"{path}: dataset_kwargs.field {field!r} is not a key (keys: {sorted(obj)[:10]})")
                return [(f"{path}[{i}]", d) for i, d in enumerate(obj[field])]
            return [(f"{path}:1", obj)]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{n}", json.loads(line)))
        except json.JSONDecodeError as e:
            err = TaskError(f"{path}:{n}: malformed JSON line: {e.msg} (column {e.colno})")
            if not skip_bad:
                raise err from None
            out.append((f"{path}:{n}", err))
    return out


# ---------------------------------------------------------------------- building a Task from a definition

def _from_definition(cfg: dict, source: str, base_dir: str, skip_bad: bool = False, inline_docs=None) -> Task:
    where = f"{source}: "
    if not isinstance(cfg, dict):
        raise TaskError(f"{where}a task definition must be a mapping, got {type(cfg).__name__}")
    if "group" in cfg or isinstance(cfg.get("task"), list):
        raise TaskError(f"{where}lm-eval group files (group: / task: [list]) are not supported; load each task's own file")
    if "task" not in cfg:
        raise TaskError(f"{where}missing required field 'task' (the task's name)")
    name = cfg["task"]
    if not isinstance(name, str) or not name:
        raise TaskError(f"{where}field 'task': expected a non-empty string, got {name!r}")
    where = f"{source}: task {name!r}: "
    for k, v in cfg.items():
        if k not in _LMEVAL_KEYS and k not in _LMFORGE_KEYS:
            raise TaskError(f"{where}unknown field {k!r}{_near(k, _LMEVAL_KEYS | _LMFORGE_KEYS)}")
        if isinstance(v, _Function):
            raise TaskError(f"{where}field {k!r}: {v!r}: Python functions in task files are not supported")
        if k in _UNSUPPORTED and v not in (None, False):
            raise TaskError(f"{where}field {k!r} ({_UNSUPPORTED[k]}) is not supported")
    ot = cfg.get("output_type", "generate_until")
    if ot not in OUTPUT_TYPES:
        raise TaskError(f"{where}field 'output_type': unknown {ot!r}{_near(ot, OUTPUT_TYPES)}; expected one of {', '.join(OUTPUT_TYPES)}")
    sources = [k for k in ("generator", "docs", "dataset_path") if k in cfg]
    if inline_docs is None and not sources:
        raise TaskError(f"{where}no documents: give one of 'generator', 'docs' or 'dataset_path' (json + dataset_kwargs.data_files)")
    if len(sources) > 1:
        raise TaskError(f"{where}documents given twice ({', '.join(sources)}); give one")
    if "dataset_path" in cfg:
        dp = cfg["dataset_path"]
        if dp not in ("json", "jsonl") or "data_files" not in (cfg.get("dataset_kwargs") or {}):
            raise TaskError(f"{where}field 'dataset_path': {dp!r}: lmforge reads local files only "
                            "(dataset_path: json with dataset_kwargs.data_files)")
    for k in ("doc_to_text",) if ot != "loglikelihood_rolling" else ():
        if k not in cfg:
            raise TaskError(f"{where}missing required field {k!r}")
    if ot == "multiple_choice" and "doc_to_choice" not in cfg:
        raise TaskError(f"{where}missing required field 'doc_to_choice' (multiple_choice needs choices)")
    if ot in ("multiple_choice", "generate_until", "loglikelihood") and "doc_to_target" not in cfg:
        raise TaskError(f"{where}missing required field 'doc_to_target'")
    if ot == "loglikelihood_rolling" and "doc_to_target" not in cfg and "doc_to_text" not in cfg:
        raise TaskError(f"{where}missing required field 'doc_to_target' (the text a rolling task scores)")
    for k in ("doc_to_text", "doc_to_target", "doc_to_choice", "description", "gen_prefix"):
        v = cfg.get(k)
        if isinstance(v, str):
            import jinja2
            try:
                _template(v)
            except jinja2.TemplateSyntaxError as e:
                raise TaskError(f"{where}field {k!r}: bad template {v!r}: {e.message} (template line {e.lineno})") from None
    for k in ("target_delimiter", "fewshot_delimiter", "description"):
        if k in cfg and not isinstance(cfg[k], str):
            raise TaskError(f"{where}field {k!r}: expected a string, got {cfg[k]!r}")

    def _int(k, default, lo=0):
        v = cfg.get(k, default)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise TaskError(f"{where}field {k!r}: expected an integer >= {lo}, got {v!r}")
        return v

    num_fewshot = _int("num_fewshot", 0)
    repeats = _int("repeats", 1, lo=1)
    fs_cfg = cfg.get("fewshot_config") or {}
    if not isinstance(fs_cfg, dict):
        raise TaskError(f"{where}field 'fewshot_config': expected a mapping, got {fs_cfg!r}")
    sampler = fs_cfg.get("sampler", "default")
    if sampler not in ("default", "first_n"):
        raise TaskError(f"{where}fewshot_config.sampler: {sampler!r} is not supported (default, first_n)")
    samples = fs_cfg.get("samples")
    if samples is not None and not (isinstance(samples, list) and all(isinstance(s, dict) for s in samples)):
        raise TaskError(f"{where}fewshot_config.samples: expected a list of documents")

    gk = cfg.get("generation_kwargs")
    fewshot_delimiter = cfg.get("fewshot_delimiter", "\n\n")
    if ot == "generate_until":
        if gk is None:
            gk = {"until": [fewshot_delimiter], "do_sample": False, "temperature": 0.0, "max_gen_toks": DEFAULT_MAX_GEN_TOKS}
        elif not isinstance(gk, dict):
            raise TaskError(f"{where}field 'generation_kwargs': expected a mapping, got {gk!r}")
        else:
            gk = dict(gk)
            if "temperature" in gk:
                gk["temperature"] = float(gk["temperature"])
            if "until" not in gk:
                gk["until"] = [fewshot_delimiter]
            if isinstance(gk["until"], str):
                gk["until"] = [gk["until"]]

    # filters
    filters = []
    fl = cfg.get("filter_list")
    if fl is not None:
        if not isinstance(fl, list):
            raise TaskError(f"{where}field 'filter_list': expected a list of {{name, filter: [...]}}")
        for j, f in enumerate(fl):
            if not isinstance(f, dict) or "filter" not in f:
                raise TaskError(f"{where}filter_list[{j}]: expected a mapping with 'name' and 'filter'")
            steps = [M.check_filter(s, f"{where}filter_list[{j}].filter: ") for s in (f.get("filter") or [])]
            filters.append((str(f.get("name", f"filter{j}")), steps))
    # metrics
    mets = []
    ml = cfg.get("metric_list")
    if ml is None:
        mets = [(m, {}) for m in _DEFAULT_METRICS[ot]]
    else:
        if not isinstance(ml, list) or not ml:
            raise TaskError(f"{where}field 'metric_list': expected a non-empty list of {{metric: NAME, ...}}")
        for j, m in enumerate(ml):
            if not isinstance(m, dict) or "metric" not in m:
                raise TaskError(f"{where}metric_list[{j}]: expected a mapping with a 'metric' key, got {m!r}")
            mname = M.check_metric(m["metric"], f"{where}metric_list[{j}].metric: ")
            kwargs = {k: v for k, v in m.items() if k not in ("metric", "aggregation", "higher_is_better", "hf_evaluate")}
            if mname == "exact_match":
                bad = set(kwargs) - _EXACT_OPTS
                if bad:
                    raise TaskError(f"{where}metric_list[{j}]: exact_match has no option(s) {sorted(bad)}; options: {sorted(_EXACT_OPTS)}")
                rti = kwargs.get("regexes_to_ignore")
                if rti is not None and not isinstance(rti, list):
                    raise TaskError(f"{where}metric_list[{j}].regexes_to_ignore: expected a list of regexes, got {rti!r}")
            mets.append((mname, kwargs))
    allowed = {
        "multiple_choice": {"acc", "acc_norm", "acc_bytes", "exact_match"},
        "loglikelihood": {"perplexity", "acc"},
        "loglikelihood_rolling": {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"},
        "generate_until": {"exact_match"},
    }[ot]
    for mname, _ in mets:
        if mname not in allowed and not (ot == "generate_until" and M.pass_at_k_k(mname)):
            raise TaskError(f"{where}metric {mname!r} does not apply to output_type {ot!r} "
                            f"(it takes {', '.join(sorted(allowed))}{', pass@K' if ot == 'generate_until' else ''})")
        k = M.pass_at_k_k(mname)
        if k is not None and "code" not in cfg:
            raise TaskError(f"{where}metric {mname!r} needs a 'code' field (test_field, entry_point_field, timeout_s)")
    if fl is None and ot == "generate_until":
        # lm-eval's default keeps the first sample; pass@k needs every sample (exact_match scores the first)
        has_pass = any(M.pass_at_k_k(m) is not None for m, _ in mets)
        filters = [("none", [] if has_pass else [("take_first", {})])]
    names = [m for m, _ in mets]
    primary = cfg.get("primary_metric", names[0])
    if primary not in names:
        raise TaskError(f"{where}field 'primary_metric': {primary!r} is not in metric_list {names}{_near(primary, names)}")
    rb = cfg.get("random_baseline")
    if rb is not None and (isinstance(rb, bool) or not isinstance(rb, (int, float)) or not 0 <= rb < 1):
        raise TaskError(f"{where}field 'random_baseline': expected a number in [0, 1), got {rb!r}")
    code = cfg.get("code")
    if code is not None:
        if not isinstance(code, dict):
            raise TaskError(f"{where}field 'code': expected a mapping (test_field, entry_point_field, timeout_s)")
        bad = set(code) - set(CODE_FIELDS + CODE_LIMITS)
        if bad:
            raise TaskError(f"{where}field 'code': unknown key(s) {sorted(bad)}; it takes "
                            f"{', '.join(CODE_FIELDS + CODE_LIMITS)}")
        for k in CODE_LIMITS:
            v = code.get(k)
            if k in code and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
                raise TaskError(f"{where}field 'code.{k}': expected a positive number, got {v!r}")
        if "timeout_s" in code and "wall_s" in code and float(code["timeout_s"]) != float(code["wall_s"]):
            raise TaskError(f"{where}field 'code': timeout_s ({code['timeout_s']}) and wall_s ({code['wall_s']}) "
                            "are the same limit (wall-clock seconds); give one")
    unit = cfg.get("bootstrap_unit")
    if unit is not None:
        fields_ = [unit] if isinstance(unit, str) else unit
        if not isinstance(fields_, list) or not fields_ or not all(isinstance(f, str) and f for f in fields_):
            raise TaskError(f"{where}field 'bootstrap_unit': expected a document field name or a list of them "
                            f"(the fields whose values name a cluster of correlated documents), got {unit!r}")
        unit = tuple(fields_)
    fs_split = fs_cfg.get("split", cfg.get("fewshot_split"))
    for k in ("test_split", "validation_split", "training_split"):
        if k in cfg and cfg[k] is not None and not isinstance(cfg[k], str):
            raise TaskError(f"{where}field {k!r}: expected a split name, got {cfg[k]!r}")
    generator = "generator" in cfg
    for k in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        v = cfg.get(k)
        if v is not None and not isinstance(v, (str, int, list, dict)) or isinstance(v, bool):
            raise TaskError(f"{where}field {k!r}: expected a template, a field name{', an int' if k == 'doc_to_target' else ''} or a list, got {v!r}")
    task = Task(
        name=name, output_type=ot, config=cfg, source=source, base_dir=base_dir,
        doc_to_text=cfg.get("doc_to_text"), doc_to_target=cfg.get("doc_to_target"), doc_to_choice=cfg.get("doc_to_choice"),
        description=cfg.get("description", "") or "", target_delimiter=cfg.get("target_delimiter", " "),
        fewshot_delimiter=fewshot_delimiter, gen_prefix=cfg.get("gen_prefix"),
        test_split=cfg.get("test_split", "private" if generator else None),
        validation_split=cfg.get("validation_split", "dev" if generator else None),
        training_split=cfg.get("training_split", "train" if generator else None),
        fewshot_split=fs_split if fs_split is not None else ("train" if generator else None),
        fewshot_sampler=sampler, fewshot_samples=samples, num_fewshot=num_fewshot,
        generation_kwargs=gk, repeats=repeats, filters=filters, metrics=mets, primary_metric=primary,
        random_baseline=None if rb is None else float(rb), code=code, bootstrap_unit=unit, skip_bad=skip_bad,
        inline_docs=inline_docs,
    )
    if task.test_split is None and task.validation_split is None and inline_docs is None:
        splits = task.splits()
        if "test" in splits:
            task.test_split = "test"
        elif "validation" in splits:
            task.validation_split = "validation"
        else:
            raise TaskError(f"{where}no test_split or validation_split, and the data has no 'test' split (splits: {splits})")
    if inline_docs is not None and task.test_split is None and task.validation_split is None:
        task.test_split = "test"
    return task


def _resolve_include(cfg: dict, path: Path, depth: int = 0) -> dict:
    inc = cfg.get("include")
    if inc is None:
        return cfg
    if depth > 8:
        raise TaskError(f"{path}: include: nested too deep")
    p = Path(inc)
    p = p if p.is_absolute() else path.parent / p
    if not p.is_file():
        raise TaskError(f"{path}: field 'include': {inc!r}: file not found ({p})")
    base = _yaml_load(p)
    if not isinstance(base, dict):
        raise TaskError(f"{p}: an included file must be a mapping")
    base = _resolve_include(base, p, depth + 1)
    merged = {**base, **{k: v for k, v in cfg.items() if k != "include"}}
    merged.pop("include", None)
    return merged


def _load_jsonl_task(path: Path, skip_bad: bool) -> Task:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TaskError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    lines = text.splitlines()
    first = next((i for i, ln in enumerate(lines) if ln.strip()), None)
    if first is None:
        raise TaskError(f"{path}: empty task file")
    try:
        cfg = json.loads(lines[first])
    except json.JSONDecodeError as e:
        raise TaskError(f"{path}:{first + 1}: malformed JSON (the task definition line): {e.msg} (column {e.colno})") from None
    if not isinstance(cfg, dict) or "task" not in cfg:
        raise TaskError(f"{path}:{first + 1}: the first line must be the task definition, an object with a 'task' field")
    docs: dict[str, list] = {}
    for n in range(first + 1, len(lines)):
        ln = lines[n]
        if not ln.strip():
            continue
        w = f"{path}:{n + 1}"
        try:
            d = json.loads(ln)
        except json.JSONDecodeError as e:
            err = TaskError(f"{w}: malformed JSON line: {e.msg} (column {e.colno})")
            if not skip_bad:
                raise err from None
            docs.setdefault(cfg.get("test_split") or "test", []).append((w, err))
            continue
        if not isinstance(d, dict):
            err = TaskError(f"{w}: a document must be a JSON object, got {type(d).__name__}")
            if not skip_bad:
                raise err
            docs.setdefault(cfg.get("test_split") or "test", []).append((w, err))
            continue
        split = d.pop("split", "test")
        docs.setdefault(str(split), []).append((w, d))
    for rows in docs.values():
        _fill_missing(rows)
    for k in ("generator", "docs", "dataset_path", "dataset_kwargs"):
        if k in cfg:
            raise TaskError(f"{path}:{first + 1}: field {k!r}: a JSONL task file carries its documents on its own lines")
    return _from_definition(cfg, str(path), str(path.parent), skip_bad, inline_docs=docs)


def load_task(path, *, skip_bad: bool = False) -> list[Task]:
    """The tasks of a YAML file, a JSONL task file, or a directory (every ``*.yaml`` / ``*.yml`` /
    ``*.jsonl`` under it that defines a task; lm-eval's include templates and group files there
    are passed over). ``skip_bad``: malformed lines and bad documents are skipped and counted
    (``task.skipped[split]``) instead of raising."""
    path = Path(path)
    if path.is_dir():
        out = []
        for p in sorted(list(path.rglob("*.yaml")) + list(path.rglob("*.yml")) + list(path.rglob("*.jsonl"))):
            if p.suffix == ".jsonl":
                try:
                    head = p.read_text(encoding="utf-8").lstrip().split("\n", 1)[0]
                    if '"task"' not in head:
                        continue  # a data file, not a task file
                except (OSError, UnicodeDecodeError):
                    continue
                out.extend(load_task(p, skip_bad=skip_bad))
                continue
            cfg = _yaml_load(p)
            if not isinstance(cfg, dict) or "task" not in cfg or "group" in cfg or isinstance(cfg.get("task"), list):
                continue
            out.append(_from_definition(_resolve_include(cfg, p), str(p), str(p.parent), skip_bad))
        if not out:
            raise TaskError(f"{path}: no task files (*.yaml, *.yml, *.jsonl with a 'task' field) in this directory")
        return out
    if not path.exists():
        raise TaskError(f"{path}: task file not found")
    if path.suffix == ".jsonl":
        return [_load_jsonl_task(path, skip_bad)]
    if path.suffix not in (".yaml", ".yml"):
        raise TaskError(f"{path}: a task file is .yaml, .yml or .jsonl")
    cfg = _yaml_load(path)
    if isinstance(cfg, dict):
        cfg = _resolve_include(cfg, path)
    return [_from_definition(cfg, str(path), str(path.parent), skip_bad)]


def builtin_task_dir() -> Path:
    """Where the built-in task definitions live (package data)."""
    return Path(__file__).parent / "tasks"


def _index(dirpath: Path, skip_bad: bool) -> dict[str, Task]:
    if not dirpath.is_dir():
        return {}
    try:
        return {t.name: t for t in load_task(dirpath, skip_bad=skip_bad)}
    except TaskError as e:
        if "no task files" in str(e):
            return {}
        raise


def load_tasks(names, include_path=None, *, skip_bad: bool = False) -> list[Task]:
    """Tasks by name: a path to a task file or directory, a task defined under ``include_path``
    (a directory or a list of them), or a built-in task (``src/lmforge/evaluate/tasks/*.yaml``).
    A name that is none of these is an error listing the nearest known names."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    includes = [] if include_path is None else ([include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path))
    known: dict[str, Task] = {}
    for d in includes:
        if not Path(d).is_dir():
            raise TaskError(f"{d}: include_path is not a directory")
        for n, t in _index(Path(d), skip_bad).items():
            known.setdefault(n, t)
    builtins = None
    out = []
    for name in names:
        name = str(name).strip()
        if name in known:
            out.append(known[name])
            continue
        p = Path(name)
        if p.exists():
            out.extend(load_task(p, skip_bad=skip_bad))
            continue
        if builtins is None:
            builtins = _index(builtin_task_dir(), skip_bad)
        if name in builtins:
            out.append(builtins[name])
            continue
        all_names = sorted(set(known) | set(builtins))
        raise TaskError(f"unknown task {name!r}{_near(name, all_names)}: not a file or directory, not under "
                        f"include_path, not a built-in task (known: {', '.join(all_names) or 'none'})")
    return out
