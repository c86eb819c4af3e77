"""Recipes: one TOML file naming the stages of a run and their settings.

Knows the recipe's shape (a dataclass per stage; ``data`` and ``train`` are the
same configs ``lmforge data prepare`` and ``lmforge pretrain`` take) and checks
it completely before any work starts: an unknown stage or field, or a value
of the wrong type, is an error naming it, and so is a model that the recipe
exports but the HF family cannot express (``lmforge.model.hf.check_exportable``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from .._config import apply_overrides, from_dict, load_file
from ..data.prepare import PrepareConfig, validate as validate_data
from ..train.trainer import TrainConfig

STAGES = ("fetch", "clean", "tokenizer", "shards", "pretrain", "eval", "export", "demo")


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


@dataclass
class ExportStage:
    arch: str = ""  # "" = the model's own family; "none" skips the HF export


@dataclass
class DemoStage:
    conversation: list[str] = field(default_factory=lambda: ["HAMLET.\nWhat news?\n", "OPHELIA.\nMy lord,"])
    max_tokens: int = 60


@dataclass
class Recipe:
    name: str = "default"
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    fetch: FetchStage = field(default_factory=FetchStage)
    data: PrepareConfig = field(default_factory=PrepareConfig)
    tokenizer: TokenizerStage = field(default_factory=TokenizerStage)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalStage = field(default_factory=EvalStage)
    export: ExportStage = field(default_factory=ExportStage)
    demo: DemoStage = field(default_factory=DemoStage)


def find_recipe(name_or_path: str | None) -> Path:
    if not name_or_path:
        name_or_path = "default"
    p = Path(name_or_path)
    if p.exists():
        return p
    here = Path(__file__).resolve()
    for root in (Path.cwd(), *here.parents):
        for cand in (root / "recipes" / f"{name_or_path}.toml", root / "recipes" / name_or_path):
            if cand.is_file():
                return cand
    raise FileNotFoundError(f"no recipe {name_or_path!r} (a file, or recipes/{name_or_path}.toml)")


def load_recipe(name_or_path: str | None = None, overrides: list[str] | None = None) -> tuple[Recipe, Path]:
    path = find_recipe(name_or_path)
    d = load_file(path)
    recipe = from_dict(Recipe, d)
    apply_overrides(recipe, overrides)
    validate(recipe)
    return recipe, path


def validate(r: Recipe) -> None:
    unknown = [s for s in r.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"stages: unknown stage(s) {unknown}; known: {', '.join(STAGES)}")
    order = [s for s in STAGES if s in r.stages]
    if order != list(r.stages):
        raise ValueError(f"stages: must keep the order {', '.join(STAGES)} (got {', '.join(r.stages)})")
    if r.tokenizer.kind not in ("bpe", "unigram", "wordpiece", "char"):
        raise ValueError(f"tokenizer.kind: expected bpe, unigram, wordpiece or char, got {r.tokenizer.kind!r}")
    if r.tokenizer.vocab_size < 260 and r.tokenizer.kind == "bpe":
        raise ValueError(f"tokenizer.vocab_size: a byte-level BPE needs at least 260, got {r.tokenizer.vocab_size}")
    validate_data(r.data)
    t = r.train
    if not (t.max_steps or t.max_tokens or t.max_time):
        raise ValueError("train: give a bound (max_steps, max_tokens or max_time)")
    from ..model.config import PRESETS

    if t.preset and t.preset not in PRESETS:
        raise ValueError(f"train.preset: unknown preset {t.preset!r}; known: {', '.join(sorted(PRESETS))}")
    if "pretrain" in r.stages or "export" in r.stages:
        validate_model(r)


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
    arch = r.export.arch or mcfg.arch
    if arch == "none":
        raise ValueError("export: the model's arch is 'none' (not exported); set train.model.arch or export.arch "
                         "to an HF family, export.arch = 'none' to skip the stage, or leave export out of stages")
    try:
        check_exportable(mcfg, arch)
    except ValueError as e:
        raise ValueError(f"export: {e} (set export.arch = 'none' to skip the export)") from None


def recipe_dict(r: Recipe) -> dict:
    return asdict(r)
