"""Fixtures of the launch matrix: one tiny Llama with the SmolLM2 tokenizer, tiny data, and the session's cache of
finished one-process reference runs; cells marked ``launch_full`` run only with ``RPSFT_LAUNCH_FULL=1``
(``make test-launch``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from . import matrix


def pytest_collection_modifyitems(config, items):
    if os.environ.get("RPSFT_LAUNCH_FULL") == "1":
        return
    skip = pytest.mark.skip(reason="launch_full cell: `make test-launch` (RPSFT_LAUNCH_FULL=1) runs every cell")
    for item in items:
        if "launch_full" in item.keywords:
            item.add_marker(skip)


_TIMES: list[tuple[str, float, float]] = []  # (launch, wall s, CPU s)


def pytest_terminal_summary(terminalreporter):
    if _TIMES:
        terminalreporter.write_sep("-", f"launch matrix: {len(_TIMES)} launches, {sum(t[1] for t in _TIMES):.0f} s "
                                        f"wall, {sum(t[2] for t in _TIMES):.0f} s CPU")
        for name, wall, cpu in _TIMES:
            terminalreporter.write_line(f"{wall:7.1f} s wall {cpu:7.1f} s CPU  {name}")
    for what, d in matrix.DISTANCES:
        terminalreporter.write_line(f"weights {d:.1e} apart (relative): {what}")


@dataclass
class Assets:
    root: Path
    model: Path  # a random-init Llama (hidden 64, 2 layers) saved with the SmolLM2 tokenizer
    train: Path  # 16 built-in synthetic math problems
    test: Path  # 8 held-out ones
    cache: Path  # RPSFT_CACHE of every launch (bases computed once per session)
    init: dict = field(repr=False)  # the model's initial weights


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Assets:
    from transformers import AutoTokenizer

    from rpsft.data.synthetic_math import write_splits
    from rpsft.models import EMBEDDED, _gguf_path
    from rpsft_testing import make_tiny_llama

    root = tmp_path_factory.mktemp("launch")
    gguf = _gguf_path(*EMBEDDED["smollm2-135m-instruct"])  # the tokenizer only: no weight conversion
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = make_tiny_llama(len(tokenizer), hidden=64, inter=128, layers=2, tokenizer=tokenizer)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    data = write_splits(root / "data", n_train=16, n_test=8, seed=0)
    return Assets(root, root / "model", data["train"], data["test"], root / "cache", matrix.weights(root / "model"))


class Matrix:
    """Launches rpsft commands for the cells, records each launch's wall time, and keeps the one-process reference
    run of each method (trained once per session, compared with by every multi-process cell of that method)."""

    # per-device batch 2 on 2 processes = the one-process reference's batch 4: the three launchers compute the same
    # optimizer steps
    GLOBAL_BATCH = 4

    def __init__(self, assets: Assets):
        self.assets = assets
        self.env = matrix.env(assets.cache)
        self._references: dict[str, matrix.Trained] = {}

    def launch(self, name: str, launcher: str, args: list[str], via: str = "rpsft") -> matrix.Launch:
        result = matrix.run(matrix.argv(launcher, args, via), self.env, cwd=self.assets.root)
        result.name = name
        _TIMES.append((name, result.seconds, result.cpu_seconds))
        return result

    def train_args(self, method: str, out: Path, processes: int, *extra: str) -> list[str]:
        a = self.assets
        sets = [f"method={method}", f"model.name={a.model}", f"data.train={a.train}", f"output_dir={out}",
                "data.limit=8", "data.max_length=128", "train.max_steps=2", "train.save_steps=1",
                f"train.batch_size={self.GLOBAL_BATCH // processes}", "train.grad_accum=1", f"train.lr={matrix.LR}",
                "train.lr_scheduler=constant", "train.warmup_ratio=0", "train.seed=0",
                "anchor.rank=8", "lora.r=4", "lora.alpha=8", *extra]
        return ["train"] + [x for s in sets for x in ("--set", s)]

    def reference(self, method: str) -> matrix.Trained:
        """``rpsft train`` of ``method`` in one process (the one-process cell's run)."""
        if method not in self._references:
            out = self.assets.root / "runs" / f"{method}-one"
            launch = self.launch(f"train {method} one", "one", self.train_args(method, out, 1))
            assert launch.returncode == 0, launch.tail()
            self._references[method] = matrix.finished(out, launch)
        return self._references[method]


@pytest.fixture(scope="session")
def launch_matrix(assets) -> Matrix:
    return Matrix(assets)
