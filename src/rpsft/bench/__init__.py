"""``rpsft bench``: the cost table of the paper's Table 1 (samples/s, steps/s, peak memory, anchor cost) for our runs.

Every method trains in its own subprocess — peak RSS (and CUDA peak memory) is per process, and one method's
allocator state must not leak into the next. The child runs :func:`rpsft.train.train` with a short ``max_steps`` and a
:class:`~rpsft.bench.child.TimingCallback`; it also times each ``RotationAnchor.accumulate_grad_`` call, so the
anchor's share of a step is measured inside the very steps being timed. Methods that are not registered
(``rpsft.methods.available()``) get a "not available" row; a child that fails gets a "failed" row with the tail of its
log — neither stops the table.

The first optimizer step is warm-up (allocator, optimizer state, first-touch) and is not timed. With ``repeats`` > 1
the methods run interleaved (A B C A B C …) and the table reports the median of the repeats, which is what makes
ratios meaningful on a shared machine.

Modules: :mod:`~rpsft.bench.run` (the parent: one subprocess per method and repeat, medians, bench.json/bench.md),
:mod:`~rpsft.bench.child` (the child: train and measure one method), :mod:`~rpsft.bench.report` (the markdown
table), :mod:`~rpsft.bench.cli` (the ``rpsft bench`` command).
"""

from .report import markdown_table
from .run import DEFAULT_METHODS, BenchSettings, run_bench

__all__ = ["DEFAULT_METHODS", "BenchSettings", "markdown_table", "run_bench"]
