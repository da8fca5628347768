"""``rpsft compare``: train several methods (and sweep grids), evaluate ID and OOD, analyse, tabulate, plot.

The shape of the paper's study (Table 2, Fig. 3-4, Fig. 6-8) on the user's model and data; see docs/compare.md.

Modules: :mod:`~rpsft.compare.config` (the compare config and its checks), :mod:`~rpsft.compare.grid` (the runs:
methods × sweep grids, identical configs trained once), :mod:`~rpsft.compare.stages` (resumable stages: evaluation,
teacher-forced exact match, the cached forgetting probe, checkpoints as points), :mod:`~rpsft.compare.run` (the
pipeline), :mod:`~rpsft.compare.report` (summary, table, trade-off and rank-sweep plots),
:mod:`~rpsft.compare.frontier` (seed-mean points, their intervals, Pareto front and its plot),
:mod:`~rpsft.compare.stats` (crossed t intervals over seeds and items, the one-seed bootstrap, Holm's correction,
Pareto extraction),
:mod:`~rpsft.compare.cli` (the command). Importing the package is cheap; torch loads with
:mod:`~rpsft.compare.run`.
"""
