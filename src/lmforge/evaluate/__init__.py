"""Evaluation: loss, perplexity and bits per byte, and a plain sampling loop (``perplexity``).

Task benchmarks, judges and contamination checks of evaluations are not here yet.
"""
