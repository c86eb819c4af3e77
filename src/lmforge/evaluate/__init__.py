"""Evaluation: bits per byte, and tasks scored the way lm-evaluation-harness scores them.

* ``perplexity``: loss, perplexity and bits per byte on shards or a text file.
* ``lm``: the contract a scored model meets (lm-eval's three request kinds).
* ``local``: an lmforge (or imported HF) model as an ``LM``: batched, context-sharing, head-only logits.
* ``openai_lm``: any OpenAI-compatible endpoint (``lmforge serve`` included) as an ``LM`` (generation).
* ``task``: a task as data (YAML or JSONL, lmforge's or lm-eval's format): documents, templates,
  choices or target, metrics, few-shot; it becomes ``lm.Request`` objects.
* ``metrics``: acc, acc_norm, byte-normalized acc, exact match, pass@k, centered scores, the CORE
  aggregate, bootstrap confidence intervals.
* ``harness``: runs tasks on an ``LM``; per-sample logs; the result object.
* ``sandbox``: runs untrusted generated code under limits (for pass@k).
* ``builtin``: the shipped tasks (corpus and synthetic), with a public dev split and a private test
  split drawn from a seed made on this machine (the Goodhart guard).
* ``judge``: LLM-as-judge, pairwise with position swap and single-answer with a rubric.
* ``contamination``: 13-gram overlap between task documents and a run's training shards.
* ``report``: the JSON result, the markdown scorecard with charts, and ``compare``.
* ``run``: ``evaluate_checkpoint``, a model directory scored and its report written (``lmforge eval
  --tasks`` and the pipeline's eval stage).
* ``lm_eval_adapter``: lmforge as an lm-eval model (``lm-eval --model lmforge``).
"""
