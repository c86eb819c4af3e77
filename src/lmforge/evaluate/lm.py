"""What the evaluation harness asks of a model: the three request kinds of lm-evaluation-harness.

Knows the contract every scored model meets (``LM``) and nothing of how one
computes it: a local lmforge model (``local.LocalLM``, batched and
context-sharing), an OpenAI-compatible endpoint (``openai_lm.OpenAILM``,
generation only) and lm-eval's own backends all satisfy it, so the same
task runs on each and the scores compare. The shapes are lm-eval's ``LM`` API
(``loglikelihood``, ``loglikelihood_rolling``, ``generate_until``), so the
adapter that lets lm-eval drive an lmforge model (``lm_eval_adapter``) is thin.

* ``loglikelihood([(context, continuation), ...]) -> [(logprob, is_greedy), ...]``:
  the summed log-probability (natural log) of the continuation's tokens given
  the context, and whether greedy decoding would have produced exactly those
  tokens. The context and continuation are tokenized as lm-eval does: the
  whole string ``context + continuation`` is encoded, and the continuation is
  the tokens after the encoded context (a trailing space of the context moves
  to the continuation first). An empty context means the document token (or
  BOS) alone is the context.
* ``loglikelihood_rolling([text, ...]) -> [logprob, ...]``: the summed
  log-probability of every token of the text, the first predicted from the
  document token alone; texts longer than the model's context are scored in
  windows (every token predicted exactly once, with as much left context as
  fits).
* ``generate_until([(context, gen_kwargs), ...]) -> [text, ...]``: the
  continuation generated from the context, cut before the first stop string.
  ``gen_kwargs``: ``until`` (list of stop strings), ``max_gen_toks`` (int),
  ``temperature`` (0 = greedy), ``top_p``, ``seed`` (int: the same seed gives the
  same sample), ``do_sample`` (bool; False forces greedy).

A context longer than the model's window is truncated from the left; the
model counts those in ``stats["truncated"]`` so the harness can report them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["LM", "Request", "KINDS"]

KINDS = ("loglikelihood", "loglikelihood_rolling", "generate_until")


@dataclass(frozen=True)
class Request:
    """One question to a model, as lm-eval's ``Instance``: which task and document it serves (``doc_id``),
    which of that document's requests it is (``idx``: a choice, or a sample for pass@k) and its arguments."""
    kind: Literal["loglikelihood", "loglikelihood_rolling", "generate_until"]
    args: tuple  # (context, continuation) | (text,) | (context, gen_kwargs)
    task: str = ""
    doc_id: int = 0
    idx: int = 0


class LM:
    """Base class of a scored model. Subclasses implement the kinds they can; the others raise a clear
    error naming the model and the kind (an endpoint without log-probabilities cannot score choices)."""

    name: str = "lm"
    max_length: int = 0  # tokens of context, 0 = unknown

    def __init__(self):
        self.stats: dict[str, int] = {"truncated": 0}

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        raise NotImplementedError(f"{self.name}: cannot score log-likelihoods (multiple-choice tasks need them)")

    def loglikelihood_rolling(self, requests: list[str]) -> list[float]:
        raise NotImplementedError(f"{self.name}: cannot score rolling log-likelihoods (perplexity tasks need them)")

    def generate_until(self, requests: list[tuple[str, dict]]) -> list[str]:
        raise NotImplementedError(f"{self.name}: cannot generate")

    def apply_chat_template(self, messages: list[dict]) -> str:
        """The conversation rendered as the model's chat format, ending with the assistant's turn opened."""
        raise NotImplementedError(f"{self.name}: has no chat template")

    def run(self, requests: list[Request]) -> list:
        """Answers for mixed requests, in order: each kind batched in one call."""
        out: list = [None] * len(requests)
        for kind in KINDS:
            idx = [i for i, r in enumerate(requests) if r.kind == kind]
            if not idx:
                continue
            args = [requests[i].args if kind != "loglikelihood_rolling" else requests[i].args[0] for i in idx]
            for i, a in zip(idx, getattr(self, kind)(args)):
                out[i] = a
        return out

