"""The data stage: built-in corpora, document sources, cleaning, quality filters,
deduplication, PII scrubbing, decontamination, tokenized shards and the loader.

``prepare`` runs the whole chain from files to shards; ``ShardLoader`` reads them back.
The names below are imported on first use, so importing the package (as the command line
does for its ``_cli`` module) loads nothing heavy.
"""

__all__ = ["CORPORA", "Document", "Problem", "corpus_files", "fetch", "iter_documents"]

_LAZY = {"CORPORA": "corpora", "corpus_files": "corpora", "fetch": "corpora", "Document": "sources",
         "Problem": "sources", "iter_documents": "sources"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
