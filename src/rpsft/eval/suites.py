"""Benchmark registry: each benchmark's data file, judge and default k (paper, evaluation protocol: k=16 for
AIME24/AIME25/AMC23, k=4 for MATH-500/OlympiadBench, k=8 for Minerva, k=4 for every OOD benchmark).

Suite names accepted by ``rpsft eval --suite`` (comma-separated, any mix):

* ``id`` (the six in-domain math benchmarks), ``ood`` (the six OOD ones), ``all`` (both);
* a benchmark name from :data:`BENCHMARKS`, or an alias (the official file stem, e.g. ``truthful_qa_mc``);
* ``NAME_test`` for an OOD benchmark: its official ``*_test.jsonl`` (first ~50 rows), e.g. ``arc_c_test``;
* a path to a JSONL file (official, GSM8K or prompt/completion rows; the judge is inferred per row);
* ``hf:DATASET[:CONFIG]:SPLIT``: a Hugging Face dataset by name (where a hub is reachable), rows as for a file;
* ``probe``: the forgetting probe (needs ``probe_base`` / ``--probe-base``).

Where the files live: official files under ``eval_dir`` / ``$RPSFT_EVAL_DIR`` (default ``~/.cache/rpsft/eval``, filled
by ``rpsft data eval-files --from DIR``; see :mod:`rpsft.eval.data_files`), GSM8K under ``$RPSFT_GSM8K_DIR`` (default
``~/.cache/rpsft/eval/gsm8k``), the synthetic math test split under ``$RPSFT_SYNTH_DIR`` (default
``data/synth-math``, written by ``rpsft data synth-math``). A missing official or GSM8K file falls back to the
benchmark's public hub dataset where one exists (:mod:`rpsft.eval.hub_fallbacks`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class Benchmark:
    name: str
    source: str  # "official" | "gsm8k" | "synth" | "file" | "hf"
    file: str  # relative to its source directory (official: "id/aime-24.jsonl"), a path, or an HF dataset name
    judge: str  # "math" | "mcq" | "ifeval" | "auto" (inferred per row)
    k: int  # paper default number of samples per problem
    group: str  # "id" | "ood" | "extra"
    flex: bool = False  # also report the "last number" extraction (GSM8K convention) beside the boxed one
    split: str = "test"
    description: str = ""
    config: str | None = None  # hub dataset config (hf:DATASET:CONFIG:SPLIT)


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in [
    Benchmark("aime24", "official", "id/aime-24.jsonl", "math", 16, "id", description="AIME 2024 (30)"),
    Benchmark("aime25", "official", "id/aime-25.jsonl", "math", 16, "id", description="AIME 2025 (30)"),
    Benchmark("amc23", "official", "id/amc.jsonl", "math", 16, "id", description="AMC 2023 (40)"),
    Benchmark("math500", "official", "id/math500.jsonl", "math", 4, "id", description="MATH-500"),
    Benchmark("olympiadbench", "official", "id/olympiadBench.jsonl", "math", 4, "id",
              description="OlympiadBench (675)"),
    Benchmark("minerva", "official", "id/minerva.jsonl", "math", 8, "id", description="Minerva math (272)"),
    Benchmark("gpqa", "official", "ood/gpqa.jsonl", "mcq", 4, "ood", description="GPQA (448, A-D)"),
    Benchmark("ifeval", "official", "ood/ifeval_loose.jsonl", "ifeval", 4, "ood", description="IFEval, loose"),
    Benchmark("mmlu_pro", "official", "ood/mmlu_pro.jsonl", "mcq", 4, "ood", description="MMLU-Pro (70, A-J)"),
    Benchmark("supergpqa", "official", "ood/supergpqa.jsonl", "mcq", 4, "ood", description="SuperGPQA (405)"),
    Benchmark("safety", "official", "ood/safety_benchmark.jsonl", "mcq", 4, "ood",
              description="choose the safer of two responses (1000)"),
    Benchmark("truthfulqa", "official", "ood/truthful_qa_mc.jsonl", "mcq", 4, "ood",
              description="TruthfulQA MC (684)"),
    Benchmark("arc_c", "official", "ood/arc_c.jsonl", "mcq", 4, "extra", description="ARC-Challenge (1172)"),
    Benchmark("commonsenseqa", "official", "ood/commonsenseqa.jsonl", "mcq", 4, "extra",
              description="CommonsenseQA (1221)"),
    Benchmark("gsm8k", "gsm8k", "test.jsonl", "math", 1, "extra", flex=True, description="GSM8K test (1319)"),
    Benchmark("synth-math", "synth", "test.jsonl", "math", 1, "extra", flex=True,
              description="the project's synthetic math test split"),
]}

GROUPS = {
    "id": ["aime24", "aime25", "amc23", "math500", "olympiadbench", "minerva"],
    "ood": ["gpqa", "ifeval", "mmlu_pro", "supergpqa", "safety", "truthfulqa"],
}
GROUPS["all"] = GROUPS["id"] + GROUPS["ood"]

# official file stems (and a few spellings) -> registry names
ALIASES = {"aime-24": "aime24", "aime-25": "aime25", "amc": "amc23", "olympiadBench": "olympiadbench",
           "olympiad": "olympiadbench", "math-500": "math500", "ifeval_loose": "ifeval", "mmlu-pro": "mmlu_pro",
           "safety_benchmark": "safety", "truthful_qa_mc": "truthfulqa", "truthful_qa": "truthfulqa",
           "arc-c": "arc_c", "arc_challenge": "arc_c", "csqa": "commonsenseqa", "synth_math": "synth-math"}

PROBE = "probe"


class SuiteError(ValueError):
    """An unknown suite or benchmark name; the message lists what is accepted."""


def _lookup(name: str) -> Benchmark | None:
    key = ALIASES.get(name, ALIASES.get(name.lower(), name.lower()))
    return BENCHMARKS.get(key)


def resolve_benchmark(name: str) -> Benchmark:
    """One name -> a Benchmark (registry name, alias, ``NAME_test``, JSONL path or ``hf:DATASET[:SPLIT]``)."""
    b = _lookup(name)
    if b is not None:
        return b
    if name.endswith("_test"):
        base = _lookup(name[: -len("_test")])
        if base is not None and base.source == "official" and base.file.startswith("ood/"):
            return replace(base, name=name, file=base.file[: -len(".jsonl")] + "_test.jsonl",
                           description=base.description + ", first ~50 rows")
    if name.startswith("hf:"):
        from rpsft.data.sources import parse_hf_spec

        spec = parse_hf_spec(name, "test")
        return Benchmark(name, "hf", spec.name, "auto", 1, "extra", split=spec.split, config=spec.config,
                         description=f"Hugging Face dataset {spec}")
    if name.endswith((".jsonl", ".json", ".parquet", ".arrow", ".csv")) or os.sep in name:
        return Benchmark(Path(name).stem, "file", name, "auto", 1, "extra", description=name)
    known = ", ".join(sorted(BENCHMARKS))
    raise SuiteError(
        f"unknown suite or benchmark {name!r}. Use one of: id, ood, all, {PROBE}, {known}; NAME_test for an OOD "
        f"benchmark's *_test file (e.g. arc_c_test); a path to a .jsonl file; or hf:DATASET[:CONFIG]:SPLIT")


def expand_suites(suites: list[str] | str) -> tuple[list[Benchmark], bool]:
    """Suite spec -> (benchmarks in order without duplicates, whether the forgetting probe was asked for)."""
    names = [s.strip() for s in (suites.split(",") if isinstance(suites, str) else
                                 [p for s in suites for p in str(s).split(",")]) if s.strip()]
    if not names:
        raise SuiteError("no suite given; use e.g. --suite id, --suite ood, --suite gsm8k or --suite arc_c_test")
    out: list[Benchmark] = []
    probe = False
    for name in names:
        if name == PROBE:
            probe = True
            continue
        for b in ([BENCHMARKS[x] for x in GROUPS[name]] if name in GROUPS else [resolve_benchmark(name)]):
            if b.name not in {o.name for o in out}:
                out.append(b)
    return out, probe


def cache_home() -> Path:
    """The rpsft cache (same rule as ``rpsft.models.cache_root``, without importing torch)."""
    if os.environ.get("RPSFT_CACHE"):
        return Path(os.environ["RPSFT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rpsft"


def default_eval_home() -> Path:
    return cache_home() / "eval"


def eval_dir_default() -> Path:
    return Path(os.environ["RPSFT_EVAL_DIR"]).expanduser() if os.environ.get("RPSFT_EVAL_DIR") else \
        default_eval_home()


def gsm8k_dir_default() -> Path:
    return Path(os.environ["RPSFT_GSM8K_DIR"]).expanduser() if os.environ.get("RPSFT_GSM8K_DIR") else \
        default_eval_home() / "gsm8k"


def _default_dir(env: str, rel: str) -> Path:
    if os.environ.get(env):
        return Path(os.environ[env]).expanduser()
    # official and GSM8K files: the user's cache, never the current directory
    return {"RPSFT_EVAL_DIR": eval_dir_default, "RPSFT_GSM8K_DIR": gsm8k_dir_default}.get(env, lambda: Path(rel))()


def source_path(b: Benchmark, eval_dir: str | Path | None = None) -> Path | str:
    """Where a benchmark's rows are read from; a missing file raises FileNotFoundError naming the path and the
    setting that moves it."""
    if b.source == "hf":
        return b.file
    if b.source == "official":
        root, how = (Path(eval_dir).expanduser(), "the eval_dir argument / --eval-dir") if eval_dir else \
            (_default_dir("RPSFT_EVAL_DIR", ""), "--eval-dir or $RPSFT_EVAL_DIR")
        path = root / b.file
        hint = (f"point {how} at the directory holding id/ and ood/ (the official release's evaluation/data "
                f"folder, jinhangzhan/RPSFT), or install them with `rpsft data eval-files --from DIR`")
    elif b.source == "gsm8k":
        path = _default_dir("RPSFT_GSM8K_DIR", "") / b.file
        hint = ("set $RPSFT_GSM8K_DIR to the directory holding GSM8K's test.jsonl (question/answer rows), or run "
                "`rpsft data eval-files --from DIR --gsm8k FILE`")
    elif b.source == "synth":
        path = _default_dir("RPSFT_SYNTH_DIR", "data/synth-math") / b.file
        hint = "run `rpsft data synth-math` first, or set $RPSFT_SYNTH_DIR to the directory holding test.jsonl"
    else:
        path = Path(b.file).expanduser()
        hint = "check the path given to --suite"
    if not path.is_file():
        raise FileNotFoundError(f"benchmark {b.name!r}: data file {path.resolve()} does not exist; {hint}")
    return path
