"""lmforge: large language models from scratch, checked against the references.

Stages live in subpackages (``lmforge.tokenize``, ``lmforge.data``, ...); each
stage is a plain function that the ``lmforge`` command line also calls.
``lmforge.load(path)`` opens a model directory as an ``LM`` (``lmforge.infer.llm``)
that generates, streams and chats; ``import lmforge`` itself imports nothing heavy.
"""

__version__ = "0.1.0"


def load(path, device: str = "cpu", **engine_options):
    """An lmforge or HF model directory as an ``lmforge.infer.LM``: ``.generate``, ``.stream``, ``.chat``.

    ``engine_options``: ``num_blocks``, ``block_size``, ``max_batch_tokens``, ``max_running`` and
    ``max_tokens`` (the default cap on a completion's length); see ``lmforge.infer.llm.LM``."""
    from .infer.llm import LM

    return LM.load(path, device=device, **engine_options)
