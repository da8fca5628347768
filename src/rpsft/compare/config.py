"""The ``rpsft compare`` config: what to train (methods, sweep grids), how to evaluate (ID, OOD, probe), and its
loader with the checks that run before anything trains."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, apply_overrides, load_section, read_config_file


@dataclass
class EvalSpec:
    suites: list[str] = field(default_factory=list)
    optional: list[str] = field(default_factory=list)  # run only when their data files are present
    limit: int | None = None
    greedy: bool = True
    k: int | None = None
    max_new_tokens: int | None = None
    batch_size: int | None = None
    loglik: bool = False
    mc_protocol: str = "paper"  # multiple-choice protocol: paper | lm-eval (rpsft.eval.loglik)
    # prompt/completion JSONL (or a suite name whose file holds completions, e.g. synth-math) scored by
    # teacher-forced exact match: one forward pass per batch instead of max_new_tokens decoding steps
    teacher_forced: str | None = None


@dataclass
class CompareConfig:
    output_dir: str = "results/compare"
    train_config: str = "configs/demo.yaml"
    train_set: list[str] = field(default_factory=list)  # overrides for every run
    methods: list[dict] = field(default_factory=lambda: [{"name": "sft"}, {"name": "rpsft"}])
    # one grid per entry: {"method": "rpsft", "lam": [1, 10], "rank": [128, "@ranks.json"], "set": [...]}; any
    # config key (aliases rank/lam/period/seed, or a bare anchor./train. field name) may be swept
    sweep: Any = None
    eval_steps: list[int] = field(default_factory=list)  # also evaluate each run at these optimizer steps
    forgetting: str = "probe_kl"  # the frontier's y axis: probe_kl | probe_nll_delta | ood_drop
    pairs: list = field(default_factory=list)  # [[point, point], ...]: paired differences reported side by side
    bootstrap: int = 2000  # resamples per paired bootstrap interval
    probe_prompts: str | None = None  # a JSONL of {"prompt"} rows instead of the shipped probe set
    probe_max_new_tokens: int = 64  # length of the base's answers the probe scores (its cost is linear in it)
    keep_checkpoints: bool = True  # False: delete a finished run's checkpoint-N dirs (a copy of the weights each)
    probe_cache: bool = True  # keep the base's probe log-probs on disk (float16) instead of recomputing per point
    id: EvalSpec = field(default_factory=lambda: EvalSpec(suites=["synth-math"], limit=50, max_new_tokens=160))
    ood: EvalSpec = field(default_factory=lambda: EvalSpec(loglik=True))
    probe: bool = True
    rotation: bool = True
    drift_data: str | None = None  # default: the ID training data
    drift_limit: int = 32
    blocks: bool = True  # per point: ΔW split into the blocks of the base's top-k frame (App. C.3), vs forgetting
    blocks_rank: Any = None  # k of that frame, as anchor.rank takes it; None: the training config's anchor.rank
    eval_dir: str | None = None  # official evaluation files (else RPSFT_EVAL_DIR / ~/.cache/rpsft/eval)




def load_compare_config(path: str | Path | None, overrides: list[str] | None = None) -> CompareConfig:
    """The compare config from ``path`` and ``--set`` overrides, through the one config loader (coercion,
    did-you-mean), then the compare-specific checks — all before anything trains."""
    data = read_compare_file(Path(path)) if path is not None else {}
    apply_overrides(data, overrides, CompareConfig, label="compare", free=(), example="id.limit=20")
    if isinstance(data.get("eval_steps"), int):  # one step may be written bare
        data["eval_steps"] = [data["eval_steps"]]
    cfg = load_section(CompareConfig, data, label="compare")
    cfg.methods = [m if isinstance(m, dict) else {"name": str(m)} for m in cfg.methods]
    for m in cfg.methods:
        if "name" not in m:
            raise ConfigError(f"methods: every entry needs a name, got {m}")
    cfg.sweep = [] if cfg.sweep is None else cfg.sweep if isinstance(cfg.sweep, list) else [cfg.sweep]
    for sw in cfg.sweep:
        if not isinstance(sw, dict) or "method" not in sw:
            raise ConfigError(f"sweep: every grid is a mapping with a 'method', e.g. {{method: rpsft, lam: [1, 10]}};"
                              f" got {sw!r}")
        sweep_axes(sw)  # unknown keys fail here, before anything runs
    cfg.eval_steps = step_list(cfg.eval_steps, "eval_steps")
    for m in [*cfg.methods, *cfg.sweep]:
        if "eval_steps" in m:
            step_list(m["eval_steps"], f"eval_steps of {m.get('name', m.get('method'))}")
    if cfg.forgetting not in FORGETTING:
        raise ConfigError(f"forgetting: {cfg.forgetting!r} is not a measure; use one of {', '.join(FORGETTING)}")
    for pair in cfg.pairs:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise ConfigError(f"pairs: every entry is two point names, e.g. [rpsft-lam10-k128, sft]; got {pair!r}")
    if cfg.bootstrap < 100:
        raise ConfigError(f"bootstrap: {cfg.bootstrap} resamples is too few for a 95 % interval; use >= 1000")
    if cfg.blocks and cfg.blocks_rank is not None:
        check_blocks_rank(cfg.blocks_rank)
    return cfg


def check_blocks_rank(rank: Any) -> None:
    """``blocks_rank``'s own errors before anything trains: a bad number, or a rank map file that is not there (a
    mapping's patterns meet the real parameter names at the blocks stage, as training's do at preflight)."""
    from ..selection import SelectionError, resolve_ranks

    if isinstance(rank, str) and rank.startswith("@"):
        if not Path(rank[1:]).expanduser().is_file():
            raise ConfigError(f"blocks_rank: rank map {rank[1:]} does not exist; write it with `rpsft analyze energy` "
                              f"or give an int k")
        return
    if isinstance(rank, dict):
        return
    try:
        resolve_ranks([("probe.weight", (4096, 4096))], rank)
    except SelectionError as e:
        raise ConfigError(f"blocks_rank: {str(e).removeprefix('rank: ')}") from None


def read_compare_file(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """The mapping of a compare config file with its ``extends:`` parent merged in: the child's top-level keys
    replace the parent's, except mapping sections (``id``, ``ood``), which are merged key by key. So a study can
    grow by a file that names the study and restates only what it adds (e.g. one more ``sweep`` entry), and, with
    the same ``output_dir``, re-uses every stage the parent already finished."""
    if chain and not path.is_file():
        raise ConfigError(f"{chain[-1]}: extends {path}, which does not exist")
    data = read_config_file(path, examples="configs/compare-demo.yaml")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if path.resolve() in [c.resolve() for c in chain]:
        raise ConfigError(f"compare config {path}: `extends` makes a cycle ({' -> '.join(map(str, (*chain, path)))})")
    # as written (paths in configs are relative to the working directory), else next to the extending file
    ppath = Path(str(parent)).expanduser()
    if not ppath.is_file() and (path.parent / ppath).is_file():
        ppath = path.parent / ppath
    merged = read_compare_file(ppath, (*chain, path))
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


FORGETTING = ("probe_kl", "probe_nll_delta", "ood_drop")
SWEEP_META = ("method", "set", "label", "eval_steps")
SHORT = {"anchor.rank": "k", "anchor.lam": "lam", "anchor.budget": "eps", "anchor.period": "s", "train.seed": "seed", "train.lr": "lr",
         "train.max_steps": "steps"}


def step_list(v: Any, where: str) -> list[int]:
    v = [v] if isinstance(v, int) else list(v or [])
    if any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in v):
        raise ConfigError(f"{where}: expected optimizer steps >= 1, e.g. [10, 20, 40]; got {v}")
    return sorted(set(v))


def sweep_key(key: str) -> str:
    """The config key a sweep axis names: an alias (rank, lam, period, seed, ...), a full dotted key, or a bare
    field of the anchor or train section (``budget`` -> ``anchor.budget``); unknown ones fail with the closest."""
    from ..config import ALIASES, all_keys, unknown_key

    keys = all_keys()
    real = {"ranks": "anchor.rank"}.get(key) or ALIASES.get(key, key)
    for cand in (real, f"anchor.{key}", f"train.{key}"):
        if cand in keys:
            return cand
    raise ConfigError(f"sweep: {unknown_key(key)}")


def sweep_axes(sw: dict) -> list[tuple[str, list]]:
    """[(config key, values), ...] of one sweep entry, in the order written."""
    axes = []
    for key, vals in sw.items():
        if key in SWEEP_META:
            continue
        vals = vals if isinstance(vals, list) else [vals]
        if not vals:
            raise ConfigError(f"sweep {key}: the list of values is empty")
        axes.append((sweep_key(str(key)), vals))
    if not axes:
        raise ConfigError(f"sweep over {sw.get('method')!r} names nothing to sweep; e.g. lam: [1, 10, 100]")
    return axes


def value_name(v: Any) -> str:
    if isinstance(v, str) and v.startswith("@"):
        return Path(v[1:]).stem  # "@results/energy/ranks.json" -> "ranks"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def as_list(v: Any) -> list[str]:
    return [s.strip() for s in v.split(",")] if isinstance(v, str) else list(v or [])
