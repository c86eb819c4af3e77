"""Evaluation: loss, perplexity and bits per byte (``perplexity``).

Task benchmarks, judges and contamination checks of evaluations are not here yet.
"""
