"""`python -m xenha_operator ...`, the same as `xenha operator ...` (tests run it this way)."""

import sys

from .main import operator_main

sys.exit(operator_main(sys.argv[1:]))
