"""lmforge: large language models from scratch, checked against the references.

Stages live in subpackages (``lmforge.tokenize``, ``lmforge.data``, ...); each
stage is a plain function that the ``lmforge`` command line also calls.
"""

__version__ = "0.1.0"
