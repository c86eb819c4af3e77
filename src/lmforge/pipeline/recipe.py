"""Recipes: one TOML file naming the stages of a run and their settings.

Knows the recipe's shape (a dataclass per stage; ``data``, ``train``, ``sft`` and ``dpo`` are the
same configs ``lmforge data prepare``, ``lmforge pretrain``, ``lmforge sft`` and ``lmforge dpo`` take) and checks
it completely before any work starts: an unknown stage or field, or a value
of the wrong type, is an error naming it, and so is a model that the recipe
exports but the HF family cannot express (``lmforge.model.hf.check_exportable``),
and an ``[sft]`` setting that SFT would refuse (a choice, a bound, a data source, a LoRA
target pattern that matches none of the model's layers), and a ``[dpo]`` setting that the preference stage
would refuse (its own check, the pair generator's arguments, its preference files line by line, a sequence
length the model holds), and a ``[quantize]`` setting that quantization would refuse (``lmforge.quant``'s own
check, a group size or GGUF block that a row of the model does not fill, a GGUF type or architecture the
export cannot write). Knows nothing of how a stage runs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from .._config import apply_overrides, from_dict, load_file
from ..data.prepare import PrepareConfig, validate as validate_data
from ..align.dpo import DPOConfig
from ..align.sft import SFTConfig
from ..quant.config import QuantConfig
from ..train.trainer import TrainConfig

# a recipe whose [dpo] names neither pairs nor data: the SFT model makes pairs (the tasks [sft] trains)
DEFAULT_PAIRS = {"n": 64, "k": 6, "max_new_tokens": 24}
STAGES = ("fetch", "clean", "tokenizer", "shards", "pretrain", "sft", "dpo", "eval", "quantize", "export", "demo")
# [sft] fields the pipeline sets itself (the base is pretrain's model, out is <run>/sft, corpus generators
# read the run's shards)
SFT_PIPELINE_FIELDS = ("base", "out", "data_dir")
# [dpo] fields the pipeline sets itself (the base is the SFT model, out is <run>/dpo), and the make_pairs
# arguments of [dpo] pairs it gives (the SFT model, its tokenizer and tokens, the run's shards)
DPO_PIPELINE_FIELDS = ("base", "out")
PAIRS_PIPELINE_ARGS = ("model", "tok", "tokens", "data_dir", "progress")


@dataclass
class FetchStage:
    corpus: str = "shakespeare"


@dataclass
class TokenizerStage:
    kind: str = "bpe"
    vocab_size: int = 2048
    pattern: str = "cl100k"


@dataclass
class EvalStage:
    prompts: list[str] = field(default_factory=lambda: ["ROMEO.\n", "To be, or not to be", "KING.\nMy lords,"])
    sample_tokens: int = 80
    temperature: float = 0.8
    seed: int = 0
    # tasks scored after bits per byte (``lmforge eval --tasks``): names, task files, "default" (the built-in
    # default set, lmforge.evaluate.builtin.DEFAULT_TASKS) or "all"; [] scores none. Split "both" (the private
    # test split and the public dev split, and their gap), contamination against the run's training shards.
    tasks: list[str] = field(default_factory=lambda: ["default"])
    limit: int | None = None  # documents per task (None: each task's own n)
    bootstrap: int = 1000  # resamples for the 95% intervals


@dataclass
class QuantizeStage(QuantConfig):
    """``lmforge quantize``'s settings (``lmforge.quant.QuantConfig``: method, bits, granularity, group_size, ...;
    calibration from the run's train split) and the stage's own: the GGUF type written beside the HF export and
    the decode-speed measurement (one greedy generation of ``decode_tokens`` tokens from ``prompt``)."""
    # quant.gguf_model.TYPES (f32 | f16 | q8_0 | q4_0 | q4_k), checked against the model before any work;
    # "none": no GGUF; "auto": q8_0 when llama.cpp runs the model and Q8_0's blocks divide its rows, else none
    # (a recipe that does not name it: the stage runs for any model, the report says why there is no GGUF)
    gguf: str = "auto"
    prompt: str = "ROMEO.\n"
    decode_tokens: int = 128


def quant_config(s: QuantizeStage) -> QuantConfig:
    """The QuantConfig part of [quantize] (what ``quantize`` and the checkpoint record), copied."""
    import copy
    from dataclasses import fields as _fields

    return QuantConfig(**{f.name: copy.deepcopy(getattr(s, f.name)) for f in _fields(QuantConfig)})


@dataclass
class ExportStage:
    arch: str = ""  # "" = the model's own family; "none" skips the HF export


@dataclass
class DemoStage:
    conversation: list[str] = field(default_factory=lambda: ["HAMLET.\nWhat news?\n", "OPHELIA.\nMy lord,"])
    max_tokens: int = 60
    # with an sft stage: the user's turns of one conversation with the SFT model (greedy replies, each turn
    # seeing the ones before), shown in demo's chat.json and the report; [] for none
    chat: list[str] = field(default_factory=lambda: ["Who are you?", "What is 25 + 17?", 'Is "( [ ] )" balanced?',
                                                     'How many times does the letter "s" appear in "mississippi"?'])
    chat_max_tokens: int = 48


@dataclass
class Recipe:
    name: str = "default"
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    fetch: FetchStage = field(default_factory=FetchStage)
    data: PrepareConfig = field(default_factory=PrepareConfig)
    tokenizer: TokenizerStage = field(default_factory=TokenizerStage)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=lambda: DPOConfig(pairs=dict(DEFAULT_PAIRS)))
    eval: EvalStage = field(default_factory=EvalStage)
    quantize: QuantizeStage = field(default_factory=QuantizeStage)
    export: ExportStage = field(default_factory=ExportStage)
    demo: DemoStage = field(default_factory=DemoStage)


PACKAGE_RECIPES = Path(__file__).resolve().parent.parent / "recipes"  # shipped with the package


def recipe_dirs() -> list[Path]:
    """Where recipe names are looked up: ``./recipes`` (a user's own), then the package's."""
    return list(dict.fromkeys(p for p in (Path.cwd() / "recipes", PACKAGE_RECIPES) if p.is_dir()))


def available_recipes() -> list[str]:
    return sorted({p.stem for d in recipe_dirs() for p in d.glob("*.toml")})


def find_recipe(name_or_path: str | None) -> Path:
    """A recipe file: a path, or a name in ``./recipes`` or the package's recipes (``default``, ...)."""
    if not name_or_path:
        name_or_path = "default"
    p = Path(name_or_path)
    if p.is_file():
        return p
    name = p.name[:-5] if p.name.endswith(".toml") else p.name
    if p.parent in (Path("."), Path("recipes")):
        for d in recipe_dirs():
            if (d / f"{name}.toml").is_file():
                return d / f"{name}.toml"
    import difflib

    known = available_recipes()
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise FileNotFoundError(f"no recipe {name_or_path!r}: not a file, and not a recipe name "
                            f"(known: {', '.join(known) or 'none'}){hint}")


def load_recipe(name_or_path: str | None = None, overrides: list[str] | None = None) -> tuple[Recipe, Path]:
    path = find_recipe(name_or_path)
    d = load_file(path)
    recipe = from_dict(Recipe, d)
    if isinstance(d.get("dpo"), dict) and not {"pairs", "data"} & set(d["dpo"]):
        recipe.dpo.pairs = dict(DEFAULT_PAIRS)
    apply_overrides(recipe, overrides)
    # the preset's training recipe for every [train] field neither the file nor --set named (as pretrain)
    from ..train.trainer import apply_preset_recipe

    given = set(d.get("train", {}) if isinstance(d.get("train"), dict) else {})
    given |= {o.split("=", 1)[0].strip().split(".")[1] for o in overrides or [] if o.strip().startswith("train.")
              and "." in o.split("=", 1)[0].strip()}
    recipe.train.text = ""  # the pipeline trains on its shards
    apply_preset_recipe(recipe.train, given)
    validate(recipe)
    return recipe, path


def _pipeline_specials() -> tuple[str, ...]:
    from ..tokenize.special import default_special_tokens

    return tuple(default_special_tokens("bpe"))


PIPELINE_SPECIAL_TOKENS = _pipeline_specials()  # what the tokenizer stage reserves


def validate(r: Recipe) -> None:
    unknown = [s for s in r.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"stages: unknown stage(s) {unknown}; known: {', '.join(STAGES)}")
    order = [s for s in STAGES if s in r.stages]
    if order != list(r.stages):
        raise ValueError(f"stages: must keep the order {', '.join(STAGES)} (got {', '.join(r.stages)})")
    if r.tokenizer.kind not in ("bpe", "unigram", "wordpiece", "char"):
        raise ValueError(f"tokenizer.kind: expected bpe, unigram, wordpiece or char, got {r.tokenizer.kind!r}")
    least = 256 + len(PIPELINE_SPECIAL_TOKENS)  # the tokenizer stage's own rule (bpe.train)
    if r.tokenizer.vocab_size < least and r.tokenizer.kind == "bpe":
        raise ValueError(f"tokenizer.vocab_size: a byte-level BPE needs at least {least} (256 byte tokens + "
                         f"{len(PIPELINE_SPECIAL_TOKENS)} special tokens), got {r.tokenizer.vocab_size}")
    validate_data(r.data)
    from ..train.trainer import check_config

    t = r.train
    if t.data or t.text or t.tokenizer:
        raise ValueError("train.data, train.text and train.tokenizer are set by the pipeline (its shards and "
                         "tokenizer stages); remove them from the recipe")
    try:
        check_config(t)
    except ValueError as e:
        raise ValueError(f"train: {e}") from None
    if not (t.max_steps or t.max_tokens or t.max_time):
        raise ValueError("train: give a bound (max_steps, max_tokens or max_time)")
    from ..model.config import PRESETS

    if t.preset and t.preset not in PRESETS:
        raise ValueError(f"train.preset: unknown preset {t.preset!r}; known: {', '.join(sorted(PRESETS))}")
    if "pretrain" in r.stages or "export" in r.stages:
        validate_model(r)
    if "sft" in r.stages:
        validate_sft(r)
    if "dpo" in r.stages:
        validate_dpo(r)
    if "eval" in r.stages:
        validate_eval(r.eval)
    if "quantize" in r.stages:
        validate_quantize(r)
    if "demo" in r.stages and r.demo.chat_max_tokens < 1:
        raise ValueError(f"demo.chat_max_tokens: expected a positive number of tokens, got {r.demo.chat_max_tokens}")
    for table, stage in (("train", "pretrain"), ("sft", "sft"), ("dpo", "dpo")):
        c = getattr(r, table, None)
        if stage in r.stages and c is not None and getattr(c, "nnodes", 1) > 1:
            raise ValueError(f"{table}.nnodes = {c.nnodes}: the pipeline launches a stage on this machine only "
                             f"(nproc ranks); run `lmforge {stage} --nnodes ...` on each node instead")


def validate_quantize(r: Recipe) -> None:
    """The [quantize] table, before any work: every setting ``lmforge.quant`` checks itself (``check_config``:
    method, bits, granularity, group size, fp8 format, alpha, damp, ...), the stage's own (a GGUF type it can
    write, a positive decode length, a prompt), and against the model the recipe trains (built on the meta
    device): a calibration window the model holds, a group size that divides the rows of every linear it
    quantizes, and what the GGUF exporter checks (``quant.gguf_model``: an architecture llama.cpp runs, rows
    its type's blocks divide)."""
    import re

    from ..quant.config import check_config

    q = r.quantize
    try:
        check_config(quant_config(q))
    except ValueError as e:
        msg = re.sub(r"^quantize: ", "", str(e))
        m = re.match(r"([a-z_0-9]+)(:|\b)", msg)
        raise ValueError(f"quantize.{msg}" if m and hasattr(q, m.group(1)) else f"quantize: {msg}") from None
    from ..quant.gguf_model import TYPES as GGUF_TYPES  # (`lmforge export --format gguf --type`'s)

    if q.gguf not in (*GGUF_TYPES, "none", "auto"):
        import difflib

        close = difflib.get_close_matches(str(q.gguf), list(GGUF_TYPES), n=1)
        raise ValueError(f"quantize.gguf: unknown GGUF type {q.gguf!r}; expected one of {', '.join(GGUF_TYPES)} "
                         "or 'none' (no GGUF) or 'auto' (q8_0 where the model fits)"
                         + (f"; did you mean {close[0]!r}?" if close else ""))
    if isinstance(q.decode_tokens, bool) or not isinstance(q.decode_tokens, int) or q.decode_tokens < 1:
        raise ValueError(f"quantize.decode_tokens: expected a positive number of tokens, got {q.decode_tokens!r}")
    if not isinstance(q.prompt, str) or not q.prompt:
        raise ValueError(f"quantize.prompt: expected a non-empty prompt (the decode-speed measurement's), got {q.prompt!r}")
    if "pretrain" not in r.stages:
        return  # the model comes from an earlier run: quantize checks it when the stage loads it
    from ..train.trainer import model_config

    try:
        mcfg = model_config(r.train)
    except (TypeError, ValueError):
        return  # validate_model names the [train] problem
    check_quantizable(mcfg, q)


def check_quantizable(mcfg, q: QuantizeStage) -> None:
    """[quantize] against a model config (the model built on the meta device: no memory, no time); ValueError
    naming the field, the linear and its shape."""
    import fnmatch

    import torch
    from torch import nn

    from ..model.transformer import Transformer

    from ..quant.api import method_module

    if getattr(method_module(q.method), "NEEDS_CALIBRATION", False) and q.calib_seq_len > mcfg.max_seq_len:
        raise ValueError(f"quantize.calib_seq_len: {q.calib_seq_len} is longer than the model's context "
                         f"(max_seq_len {mcfg.max_seq_len})")
    with torch.device("meta"):
        model = Transformer(mcfg)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if q.granularity == "group" and q.method in ("rtn", "gptq", "awq"):
        for n, m in linears:
            if not any(fnmatch.fnmatch(n, g) for g in q.skip) and m.in_features % q.group_size:
                raise ValueError(f"quantize.group_size: {q.group_size} does not divide the rows of {n} (weight "
                                 f"{tuple(m.weight.shape)}: {m.in_features} input columns); choose a divisor of "
                                 f"{m.in_features} or skip the layer (quantize.skip)")
    if q.gguf in ("none", "auto"):
        return
    why = gguf_problem(mcfg, q.gguf, model)
    if why:
        raise ValueError(f"quantize.gguf: {why} (set quantize.gguf = 'none' to write no GGUF)")


def gguf_problem(mcfg, gguf: str, model=None) -> str | None:
    """Why ``lmforge.quant.gguf_model.export_gguf`` would refuse a model of config ``mcfg`` as GGUF ``gguf``
    (the exporter's own checks: an architecture llama.cpp runs, rows the type's blocks divide), or None."""
    from ..quant import gguf_model as G

    if model is None:
        import torch

        from ..model.transformer import Transformer

        with torch.device("meta"):
            model = Transformer(mcfg)
    try:
        arch = G.resolve_arch(mcfg)
        G.check_gguf_exportable(mcfg, arch)
        for n, t in G.gguf_tensors(model, arch):
            G.tensor_type(n, tuple(t.shape), gguf)
    except ValueError as e:
        return str(e)
    return None


def resolve_gguf(mcfg, gguf: str) -> tuple[str | None, str | None]:
    """(the GGUF type the quantize stage writes or None, why none): [quantize] gguf with "auto" resolved."""
    if gguf == "none":
        return None, "quantize.gguf = 'none'"
    if gguf == "auto":
        why = gguf_problem(mcfg, "q8_0")
        return (None, f"quantize.gguf = 'auto' and the model does not fit q8_0: {why}") if why else ("q8_0", None)
    return gguf, None


def validate_eval(e: EvalStage) -> None:
    """The [eval] task settings: known task names (or existing task files), a positive limit, bootstrap >= 0."""
    if e.limit is not None and e.limit < 1:
        raise ValueError(f"eval.limit: expected a positive number of documents or none, got {e.limit}")
    if e.bootstrap < 0:
        raise ValueError(f"eval.bootstrap: expected a number of resamples >= 0, got {e.bootstrap}")
    if not e.tasks:
        return
    from ..evaluate import builtin

    known = list(builtin.names())
    for t in e.tasks:
        if t in ("default", "all") or t in known or Path(t).exists():
            continue
        import difflib

        close = difflib.get_close_matches(t, known, n=1)
        raise ValueError(f"eval.tasks: unknown task {t!r} (not a built-in task nor a file; built-in: "
                         f"{', '.join(known)}; or 'default', 'all', [] for none)"
                         + (f"; did you mean {close[0]!r}?" if close else ""))


def validate_sft(r: Recipe) -> None:
    """The [sft] table, before any work: the fields the pipeline sets are not given, every setting SFT
    checks itself (``lmforge.align.sft.check_config``: bounds, choices, shares, LoRA's), every data source
    (the rules of ``lmforge.align.data``; a generator that exists; a JSONL file that exists and reads, every
    line checked), a sequence length the model holds and LoRA target patterns that select some layer of it."""
    import re
    from dataclasses import fields, replace

    from ..align.sft import SFTConfig as _C, check_config

    s, fresh = r.sft, _C()
    for k in SFT_PIPELINE_FIELDS:
        if getattr(s, k) != getattr(fresh, k):
            raise ValueError(f"sft.{k} is set by the pipeline (base: the pretrain stage's model, out: <run>/sft, "
                             f"data_dir: the run's shards); remove it from the recipe (got {getattr(s, k)!r})")
    names = {f.name for f in fields(_C)}
    try:
        check_config(replace(s, base="<the pretrain stage's model>"))
    except ValueError as e:
        msg = str(e)
        m = re.match(r"([a-z_0-9]+)[:\[ ]", msg)
        raise ValueError(f"sft.{msg}" if m and m.group(1) in names else f"sft: {msg}") from None
    validate_sources(s.sources, "sft.sources", s.on_error)
    if s.test_sources:
        validate_sources(s.test_sources, "sft.test_sources", s.on_error)
    if "pretrain" not in r.stages:
        return  # the model comes from an earlier run: checked when the stage loads it
    from ..train.trainer import model_config

    try:
        mcfg = model_config(r.train)
    except (TypeError, ValueError):
        return  # validate_model names the [train] problem
    if s.seq_len > mcfg.max_seq_len:
        raise ValueError(f"sft.seq_len: {s.seq_len} is longer than the model's context (max_seq_len "
                         f"{mcfg.max_seq_len} of the [train] model)")
    if s.lora_r:
        _check_lora_targets(mcfg, s)


def validate_sources(sources, where: str, on_error: str = "raise") -> None:
    """Each SFT data source by ``lmforge.align.data``'s rules (``{path = FILE}`` or ``{generator = NAME, n = N}``,
    optional ``weight`` and ``cap``; every source weighted or none), its generator known, its file there and
    readable (each line checked, as SFT will read it)."""
    from ..align import data as D
    from ..align.generators import GENERATORS

    if not isinstance(sources, list) or not sources:
        raise ValueError(f"{where}: expected a non-empty list of sources ({{path = FILE}} or {{generator = NAME, "
                         f"n = N}}), got {sources!r}")
    for i, src in enumerate(sources):
        try:
            D._check_source(src, i)
        except ValueError as e:
            msg = str(e)
            raise ValueError(where + msg[len("sources"):] if msg.startswith("sources") else f"{where}[{i}]: {msg}") from None
        if "generator" in src and src["generator"] not in GENERATORS:
            import difflib

            close = difflib.get_close_matches(str(src["generator"]), list(GENERATORS), n=1)
            raise ValueError(f"{where}[{i}].generator: unknown generator {src['generator']!r}; known: "
                             f"{', '.join(GENERATORS)}" + (f"; did you mean {close[0]!r}?" if close else ""))
        if "path" in src:
            if not isinstance(src["path"], str) or not Path(src["path"]).is_file():
                raise ValueError(f"{where}[{i}].path: no such file {src['path']!r} (a JSONL file of conversations)")
            D.read_conversations(src["path"], on_error=src.get("on_error", on_error))
    weighted = ["weight" in s for s in sources]
    if any(weighted) and not all(weighted):
        raise ValueError(f"{where}{[k for k, w in enumerate(weighted) if not w]}: no weight while other sources "
                         "have one; give every source a weight (shares of the mixture) or none")


def validate_dpo(r: Recipe) -> None:
    """The [dpo] table, before any work: the fields the pipeline sets are not given, every setting the stage
    checks itself (``lmforge.align.dpo.check_config``: loss types, beta, label smoothing, reference, LoRA's,
    ...), the arguments of ``pairs`` (``lmforge.align.pairs.make_pairs``'s own, its tasks known, the dev split
    only: the private test split scores the result), every preference file (``lmforge.align.pref_data`` reads
    it, each line checked), some preference data (generated pairs or files), a sequence length the model holds."""
    import inspect
    import re
    from dataclasses import fields, replace

    from ..align.dpo import DPOConfig as _C, check_config

    d, fresh = r.dpo, _C()
    for k in DPO_PIPELINE_FIELDS:
        if getattr(d, k) != getattr(fresh, k):
            raise ValueError(f"dpo.{k} is set by the pipeline (base: the sft stage's model, out: <run>/dpo); "
                             f"remove it from the recipe (got {getattr(d, k)!r})")
    if not isinstance(d.pairs, dict):
        raise ValueError(f"dpo.pairs: expected a table of lmforge.align.pairs.make_pairs arguments (e.g. "
                         f"{{n = 64, k = 4}}; {{}} for none), got {d.pairs!r}")
    if not d.pairs and not d.data:
        raise ValueError("dpo: no preference data: give dpo.pairs (pairs the SFT model makes itself, e.g. "
                         "{n = 64, k = 4}) or dpo.data (preference JSONL files), or leave dpo out of stages")
    names = {f.name for f in fields(_C)}
    try:
        check_config(replace(d, base="<the sft stage's model>"))
    except ValueError as e:
        msg = re.sub(r"^PrefLossConfig\.", "", str(e))  # (the loss fields are [dpo]'s own, flat)
        m = re.match(r"([a-z_0-9]+)[:\[ .]", msg)
        raise ValueError(f"dpo.{msg}" if m and m.group(1) in names else f"dpo: {msg}") from None
    if d.pairs:
        from ..align import pairs as P

        params = inspect.signature(P.make_pairs).parameters
        for k, v in d.pairs.items():
            if k in PAIRS_PIPELINE_ARGS:
                raise ValueError(f"dpo.pairs.{k} is set by the pipeline (the sft stage's model, its tokenizer and "
                                 f"tokens, the run's shards); remove it from the recipe")
            if k not in params:
                import difflib

                known = [p for p in params if p not in PAIRS_PIPELINE_ARGS]
                close = difflib.get_close_matches(k, known, n=1)
                raise ValueError(f"dpo.pairs: unknown argument {k!r} of make_pairs; known: {', '.join(known)}"
                                 + (f"; did you mean {close[0]!r}?" if close else ""))
        split = d.pairs.get("split", "dev")
        if split != "dev":
            raise ValueError(f"dpo.pairs.split: expected 'dev' (pairs come from the evaluation generators' dev split; "
                             f"the private test split scores the result and is never trained on), got {split!r}")
        for k in ("n", "k", "max_new_tokens"):
            v = d.pairs.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"dpo.pairs.{k}: expected a positive integer, got {v!r}")
        if "k" in d.pairs and d.pairs["k"] < 2:
            raise ValueError(f"dpo.pairs.k: expected at least 2 answers a prompt (a pair needs a correct and an "
                             f"incorrect one), got {d.pairs['k']}")
        tasks = d.pairs.get("tasks")
        if tasks is not None:
            if isinstance(tasks, str) or not isinstance(tasks, list) or not tasks:
                raise ValueError(f"dpo.pairs.tasks: expected a non-empty list of task names (of "
                                 f"{', '.join(P.PAIR_TASKS)}), or leave it out for the tasks [sft] trains, got {tasks!r}")
            for t in tasks:
                if t not in P.PAIR_TASKS:
                    import difflib

                    close = difflib.get_close_matches(str(t), list(P.PAIR_TASKS), n=1)
                    raise ValueError(f"dpo.pairs.tasks: unknown task {t!r}; known: {', '.join(P.PAIR_TASKS)}"
                                     + (f"; did you mean {close[0]!r}?" if close else ""))
        elif not pair_tasks(r):
            raise ValueError(f"dpo.pairs: none of the generators [sft] trains is a pair task ({', '.join(P.PAIR_TASKS)}); "
                             "name them in dpo.pairs.tasks")
    if not isinstance(d.data, list):
        raise ValueError(f"dpo.data: expected a list of preference JSONL files, got {d.data!r}")
    for i, p in enumerate(d.data):
        if not isinstance(p, str) or not Path(p).is_file():
            raise ValueError(f"dpo.data[{i}]: no such file {p!r} (a JSONL file of preference pairs)")
        from ..align.pref_data import read_preferences

        read_preferences(p)  # a bad line: "FILE:LINE: FIELD: problem"
    if "pretrain" not in r.stages:
        return
    from ..train.trainer import model_config

    try:
        mcfg = model_config(r.train)
    except (TypeError, ValueError):
        return
    if d.seq_len > mcfg.max_seq_len:
        raise ValueError(f"dpo.seq_len: {d.seq_len} is longer than the model's context (max_seq_len "
                         f"{mcfg.max_seq_len} of the [train] model)")


def pair_tasks(r: Recipe) -> list[str]:
    """The tasks the dpo stage makes pairs for: [dpo] pairs' own ``tasks``, else every pair task
    (``lmforge.align.pairs.PAIR_TASKS``) that a generator of [sft] trains (``align.generators.EVAL_TASKS``: sort
    trains sort and sort_numbers, multiturn addition and reverse; identity is the style task), in [sft]'s order."""
    from ..align.generators import EVAL_TASKS
    from ..align.pairs import PAIR_TASKS

    if r.dpo.pairs.get("tasks"):
        return list(r.dpo.pairs["tasks"])
    gens = [s.get("generator") for s in r.sft.sources if isinstance(s, dict)]
    return list(dict.fromkeys(t for g in gens for t in EVAL_TASKS.get(g, [g]) if t in PAIR_TASKS))


def _check_lora_targets(mcfg, s) -> None:
    """LoRA's target patterns against the model the recipe trains, built on the meta device (no memory,
    no time): a pattern that selects nothing is refused now, not after pre-training."""
    import torch

    from ..align.lora import apply_lora
    from ..align.sft import _lora_config
    from ..model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(mcfg)
        try:
            apply_lora(model, _lora_config(s))
        except ValueError as e:
            raise ValueError(f"sft.lora_targets: {e}") from None


def validate_model(r: Recipe) -> None:
    """The model must build, and export when the stages export it: fail now, not after training."""
    from ..model.hf import check_exportable
    from ..train.trainer import model_config

    try:
        mcfg = model_config(r.train)
    except (TypeError, ValueError) as e:  # (TypeError: a field ModelConfig does not have)
        raise ValueError(f"train.model: {e}") from None
    if "export" not in r.stages or r.export.arch == "none":
        return
    arch = r.export.arch or mcfg.hf_family
    if arch == "none":
        raise ValueError("export: the model's arch is 'none' (not exported); set train.model.arch or export.arch "
                         "to an HF family, export.arch = 'none' to skip the stage, or leave export out of stages")
    try:
        check_exportable(mcfg, arch)
    except ValueError as e:
        raise ValueError(f"export: {e} (set export.arch = 'none' to skip the export)") from None


def recipe_dict(r: Recipe) -> dict:
    return asdict(r)
