"""``python -m rpsft.bench SPEC``: the per-method child process of ``rpsft bench`` (:mod:`rpsft.bench.child`)."""

import sys

from .child import main

main(sys.argv[1])
