"""``python -m lmforge``: the same command line as ``lmforge``."""
import sys

from .cli import main

sys.exit(main())
