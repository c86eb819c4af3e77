"""The data stage: built-in corpora, document sources, cleaning, quality filters,
deduplication, PII scrubbing, decontamination, tokenized shards and the loader.

``prepare`` runs the whole chain from files to shards; ``ShardLoader`` reads them back.
"""
from .corpora import CORPORA, corpus_files, fetch
from .sources import Document, Problem, iter_documents

__all__ = ["CORPORA", "Document", "Problem", "corpus_files", "fetch", "iter_documents"]
