"""lmforge as an lm-evaluation-harness model: ``lm-eval --model lmforge --model_args checkpoint=DIR``.

Knows lm-eval's ``LM`` API (``lm_eval.api.model.LM``: ``Instance`` lists in, plain answers out, the
cache hook, ``apply_chat_template`` / ``tokenizer_name`` / ``chat_template`` for ``--apply_chat_template``)
and how it maps onto lmforge's own contract (``lm.LM``, here ``local.LocalLM``): the ``Instance.args``
tuples are already the tuples of ``lm.py``, so each kind is one call with the arguments unpacked and
the answers passed back in order. Knows nothing of how a model scores or generates (``local``), nor of
lmforge's own task loader and harness (``task``, ``harness``), which read the same lm-eval YAML.

Importing this module imports ``lm_eval`` (nothing else in lmforge does, so lm-eval stays optional) and
registers ``LMForgeLM`` in lm-eval's model registry as ``"lmforge"``.

How lm-eval finds it. lm-eval 0.4.13 has no plugin entry-point group: its CLI looks ``--model`` up in a
registry filled by ``lm_eval.models.MODEL_MAPPING`` and by modules that have been imported. So the
``lm-eval`` console script cannot see a model of another package; the route is this module's ``main``,
which registers the model and then runs lm-eval's own CLI unchanged, on the same arguments::

    python -m lmforge.evaluate.lm_eval_adapter --model lmforge --model_args checkpoint=DIR \\
        --tasks TASK --include_path DIR [any other lm-eval option]

In Python, ``import lmforge.evaluate.lm_eval_adapter`` before ``lm_eval.simple_evaluate(model="lmforge",
model_args="checkpoint=DIR", ...)``, or pass ``LMForgeLM(...)`` (or ``LMForgeLM(lm=<an lmforge LM>)``) as
``model``.

model_args: ``checkpoint`` (or ``pretrained``): an lmforge model directory or an HF directory
(``LocalLM.from_checkpoint``); ``batch_size`` (an int; ``auto`` / ``auto:N`` leaves the choice to
``LocalLM``; lm-eval's CLI passes 1 unless told otherwise); ``max_batch_size`` (accepted, unused);
``max_length`` (tokens of context; default the model's); ``device`` (``cpu``, ``cuda``, ``cuda:1``,
``mps``; default cuda when available, else cpu). Anything else is refused by name.

Truncation: contexts longer than the model's window are cut from the left by ``LocalLM``, which counts
them; ``stats`` here is that count, and a warning is logged when a call truncated any. ``--use_cache``:
every answer goes to lm-eval's cache hook under lm-eval's own key. One process only (rank 0 of 1).

Against lm-eval's ``hf`` backend on ``lmforge export``'s directory (whose tokenizer prepends the document
token as BOS): its default model_args give the adapter's ids for ``loglikelihood`` and ``generate_until``;
for ``loglikelihood_rolling`` it needs ``add_bos_token=False`` (with the default it prepends its prefix
token to ids that already start with BOS, scoring ``<|bos|>`` after ``<|bos|>``). That backend also needs
``accelerate``; this adapter does not. (tests/test_eval_lm_eval.py checks all three ways agree.)
"""
from __future__ import annotations

import logging
import sys
from typing import Any

import lm_eval.models  # noqa: F401  (fills the registry first: lm-eval imports its own models only into an empty one)
from lm_eval.api.model import LM as _HarnessLM
from lm_eval.api.registry import model_registry

__all__ = ["LMForgeLM", "register", "main", "run_cli"]

log = logging.getLogger(__name__)

ACCEPTED = ("checkpoint", "pretrained", "batch_size", "max_batch_size", "max_length", "device", "lm")


def _batch_size(v) -> int | None:
    """lm-eval's batch size forms: None, an int, a digit string, ``auto`` or ``auto:N`` (None: LocalLM picks)."""
    if v is None or (isinstance(v, str) and v.strip().lower().startswith("auto")):
        return None
    if isinstance(v, bool):
        raise ValueError(f"lmforge model_args: batch_size must be a positive int or 'auto', got {v!r}")
    try:
        n = int(str(v).strip()) if not isinstance(v, int) else v
    except ValueError:
        raise ValueError(f"lmforge model_args: batch_size must be a positive int or 'auto', got {v!r}") from None
    if n < 1:
        raise ValueError(f"lmforge model_args: batch_size must be a positive int or 'auto', got {v!r}")
    return n


def _max_length(v) -> int | None:
    if v is None or v == "":
        return None
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise ValueError(f"lmforge model_args: max_length must be a positive int (tokens), got {v!r}") from None
    if n < 2 or isinstance(v, bool):
        raise ValueError(f"lmforge model_args: max_length must be an int of at least 2 tokens, got {v!r}")
    return n


def _device(v) -> str:
    import torch

    if v is None or v == "":
        return "cuda" if torch.cuda.is_available() else "cpu"
    v = str(v)
    if v.startswith("cuda") and not torch.cuda.is_available():
        log.warning("lmforge: device %r requested but CUDA is not available; using cpu", v)
        return "cpu"
    return v


class LMForgeLM(_HarnessLM):
    """lm-eval's ``LM`` over an lmforge ``lm.LM`` (by default ``local.LocalLM`` of ``checkpoint``)."""

    def __init__(self, checkpoint: str | None = None, pretrained: str | None = None, batch_size=None,
                 max_batch_size=None, max_length=None, device=None, lm=None, **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"lmforge model_args: unknown argument(s) {', '.join(sorted(unknown))}; "
                             f"accepted: {', '.join(a for a in ACCEPTED if a != 'lm')}")
        if checkpoint is not None and pretrained is not None and str(checkpoint) != str(pretrained):
            raise ValueError(f"lmforge model_args: checkpoint={checkpoint!r} and pretrained={pretrained!r} "
                             "name two models; give one")
        path = checkpoint if checkpoint is not None else pretrained
        if lm is None:
            if path is None:
                raise ValueError("lmforge model_args: checkpoint=DIR is required (an lmforge model directory "
                                 "or an HF model directory)")
            from .local import LocalLM

            kw = {"batch_size": _batch_size(batch_size), "device": _device(device),
                  "max_length": _max_length(max_length)}
            lm = LocalLM.from_checkpoint(str(path), **{k: v for k, v in kw.items() if v is not None})
        self.lm = lm
        self.checkpoint = None if path is None else str(path)
        self._device = getattr(lm, "device", None)

    # ---- what lm-eval reads ----
    @property
    def stats(self) -> dict:
        return self.lm.stats

    @property
    def max_length(self) -> int:
        return self.lm.max_length

    @property
    def tokenizer_name(self) -> str:
        """Names the tokenizer and chat template in lm-eval's request-cache keys: the model path, as HFLM."""
        name = self.checkpoint or getattr(self.lm, "name", "lmforge")
        return str(name).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The Jinja source of the model's chat template (what lm-eval logs and hashes); None when disabled."""
        if chat_template is False or chat_template is None:
            return None
        spec = getattr(self.lm, "tokens", None)
        return getattr(spec, "chat_template", None) or ""

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's chat format (text), rendered by the wrapped LM (``LocalLM`` then
        encodes a context that starts with it with the conversation's own ids, control tokens included).
        ``add_generation_prompt=False`` (lm-eval's ``gen_prefix``, transformers' ``continue_final_message``):
        the last message is an assistant prefix to continue; the render of the whole conversation is cut
        just after that message's text, before whatever closes the turn."""
        if add_generation_prompt:
            return self.lm.apply_chat_template(chat_history)
        if not chat_history or chat_history[-1].get("role") != "assistant":
            raise ValueError("apply_chat_template(add_generation_prompt=False): the last message must be the "
                             "assistant's prefix to continue")
        spec, tok = getattr(self.lm, "tokens", None), getattr(self.lm, "tokenizer", None)
        if spec is None or tok is None:
            raise NotImplementedError(f"{getattr(self.lm, 'name', 'lmforge')}: continuing a final assistant "
                                      "message needs the model's TokenSpec (lm.tokens) and tokenizer (lm.tokenizer)")
        opened = self.lm.apply_chat_template(chat_history[:-1])  # the turn opened (its ids known to the LM)
        text = spec.render_chat(chat_history, add_generation_prompt=False, tok=tok)
        last = str(chat_history[-1].get("content", "")).rstrip()
        cut = text.rfind(last) if last else len(opened)
        if cut < 0:
            raise ValueError("apply_chat_template: the chat template does not show the final assistant message's "
                             "text verbatim, so it cannot be continued")
        text = text[:cut + len(last)]
        if not text.startswith(opened):
            log.warning("lmforge: the chat template renders a continued assistant turn differently from an opened "
                        "one; its control tokens are encoded as text")
        return text

    def get_model_info(self) -> dict:
        m = getattr(self.lm, "model", None)
        info: dict[str, Any] = {"model_checkpoint": self.checkpoint, "lmforge_lm": type(self.lm).__name__}
        if m is not None and hasattr(m, "parameters"):
            info["model_num_parameters"] = sum(p.numel() for p in m.parameters())
            info["model_dtype"] = str(next(m.parameters()).dtype)
        return info

    # ---- the three request kinds ----
    def _call(self, kind: str, args: list, keys: list) -> list:
        before = self.lm.stats.get("truncated", 0)
        out = list(getattr(self.lm, kind)(args))
        if len(out) != len(args):
            raise RuntimeError(f"{type(self.lm).__name__}.{kind} answered {len(out)} of {len(args)} requests")
        for k, o in zip(keys, out):
            self.cache_hook.add_partial(kind, k, o)
        cut = self.lm.stats.get("truncated", 0) - before
        if cut:
            log.warning("lmforge: %d of %d %s requests were longer than the model's %d-token window and were "
                        "truncated from the left", cut, len(args), kind, self.max_length)
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        args = [(str(r.args[0]), str(r.args[1])) for r in requests]
        return [(float(lp), bool(g)) for lp, g in self._call("loglikelihood", args, args)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [str(r.args[0]) for r in requests]
        return [float(x) for x in self._call("loglikelihood_rolling", texts, [(t,) for t in texts])]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        args, keys = [], []
        for r in requests:
            context, gen_kwargs = r.args[0], dict(r.args[1] or {})
            until = gen_kwargs.get("until")
            if until is None:
                until = []
            elif isinstance(until, str):
                until = [until]
            elif not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
                raise ValueError(f"generate_until: gen_kwargs 'until' must be a string or a list of strings, "
                                 f"got {until!r}")
            gen_kwargs["until"] = list(until)
            args.append((str(context), gen_kwargs))
            keys.append(r.args)
        return [str(s) for s in self._call("generate_until", args, keys)]


def register() -> None:
    """``LMForgeLM`` in lm-eval's model registry as ``"lmforge"`` (idempotent)."""
    current = model_registry.get("lmforge", None) if "lmforge" in model_registry else None
    if current is LMForgeLM:
        return
    if current is not None and getattr(current, "__qualname__", "") == "LMForgeLM":
        return  # this module loaded twice under two names (``python -m``): the first registration stands
    model_registry.register("lmforge")(LMForgeLM)


def run_cli(argv: list[str]) -> int:
    """lm-eval's own CLI on ``argv`` (the arguments after ``lm-eval``) with ``lmforge`` registered; the exit
    status. What ``lmforge eval lm-eval -- ARGS`` calls."""
    from lm_eval.__main__ import cli_evaluate

    register()
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as e:  # argparse errors and --help
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    # run as a script this file is ``__main__``; register the importable module's class, not this copy
    from lmforge.evaluate.lm_eval_adapter import main as _main

    sys.exit(_main())
else:
    register()
