"""The data stage: built-in corpora (``fetch``) and, later, the pre-training pipeline."""
from .sources import CORPORA, corpus_files, fetch

__all__ = ["CORPORA", "corpus_files", "fetch"]
