"""One configuration schema for the CLI and the library: dataclasses, a YAML file, and ``--set a.b=c`` overrides.

Unknown keys are errors (with the closest valid key), values are coerced to the field's type, and the resolved
configuration is written next to every run so that it can be reproduced exactly. Every config of the project (this
one, ``rpsft rl``'s, ``rpsft compare``'s) is read by the same functions: :func:`read_config_file`,
:func:`apply_overrides` for ``--set`` and :func:`load_section`, which builds a dataclass from a mapping.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .selection import DEFAULT_TARGETS

FULL_RANK_RULES = ("l2", "eq3")  # anchor.full_rank; the same names as RotationAnchor.from_model(full_rank_as=)


class ConfigError(ValueError):
    """A bad config file, key or value; the message names it and what would be valid."""


@dataclass
class ModelConfig:
    name: str = "smollm2-135m-instruct"  # embedded name, checkpoint directory, or hub id
    dtype: str = "float32"  # weights are kept in fp32: Adam updates at lr 1e-6 vanish in bf16 weights
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    train: str = "data/synth-math/train.jsonl"
    eval: str | None = None
    max_length: int = 512
    limit: int | None = None  # use only the first N training rows
    split: str = "train"  # for hub datasets
    columns: dict = field(default_factory=dict)  # rename source columns first: {their_name: our_name}
    turns: str = "all"  # multi-turn rows: train on every assistant turn (all) or only the last one (last)


@dataclass
class AnchorConfig:
    enabled: bool | None = None  # None: on for methods that need it (rpsft, l2init, complement, rpsft_lora)
    rank: Any = 768  # int k, fraction of min(m, n), mapping pattern -> k, or "@ranks.json"
    # a matrix whose k reaches min(m, n): l2 = ‖W − W0‖² (the paper's rule, App. C.2 Eq. 11) | eq3 = Eq. 3 on its
    # full-rank bases (‖P_U ΔW P_V‖² on a non-square matrix; continuous in k)
    full_rank: str = "l2"
    lam: float = 1.0  # λ of Eq. 4
    period: int = 1  # apply every `period` optimizer steps (Algorithm 1's s)
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    layers: Any = None  # None = all, or "0-9,20" / [0, 1]
    svd: str = "exact"  # exact | gram | randomized
    niter: int = 8  # power iterations for svd=randomized
    dtype: str = "float32"  # precision of bases and penalty (float64 for the precision study)
    frame_dtype: str = "fp32"  # storage of U_k, V_k: fp32 | bf16 | fp16 (lean frames + exact k×k A_ref, rpsft.frames)
    cache_dir: str | None = None  # default: <cache root>/bases
    mode: str = "auto"  # closed_form (∇R added to .grad) | autograd (λR in the last micro-batch loss) | auto
    budget: float | None = None  # ε: the relative drift d of the anchored block the run may reach (rpsft.budget)
    budget_form: str = "penalty"  # penalty: adapt λ to hold d at ε | ball: project into d ≤ ε after every step
    budget_scope: str = "all"  # all: one d for the block | type: one per matrix type | matrix (ball only): per matrix
    budget_rate: float = 0.2  # the controller changes λ by at most ×e^±rate per anchored step
    lam_min: float = 1e-6  # bounds of the adapted λ (> 0: a multiplicative controller cannot leave 0)
    lam_max: float = 1e6


@dataclass
class BaseTrainConfig:
    """The ``train:`` fields every trainer config shares (SFT's :class:`TrainConfig`, RL's ``RLTrainConfig``), with
    SFT's defaults; each subclass adds its own fields and may override a default."""
    lr: float = 1e-6
    max_steps: int = -1  # > 0 overrides epochs
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    logging_steps: int = 1
    save_steps: int = 50
    save_total_limit: int | None = 1  # newest sealed checkpoint-N kept (null: every one; guards.rotate_checkpoints)
    keep_optimizer_state: bool = False  # a finished run's checkpoints keep optimizer.pt & co (to extend it)
    seed: int = 42
    bf16: bool | None = None  # None: bf16 autocast on a CUDA GPU that supports it, fp32 on CPU
    gradient_checkpointing: bool | None = None  # None: on for a GPU; off on CPU (no memory pressure, ~30% slower)
    report_to: list[str] = field(default_factory=list)  # trackers: tensorboard, wandb, trackio, ... ([] = none)
    nan_policy: str = "stop"  # non-finite loss/penalty/gradient: stop (at that step) | skip (drop the step's update)
    nan_max_skips: int = 10  # with nan_policy=skip: stop once more than this many steps were skipped


@dataclass
class TrainConfig(BaseTrainConfig):
    epochs: float = 1.0
    batch_size: int = 4  # per device
    grad_accum: int = 4
    loss_type: str = "nll"  # TRL's SFT loss: nll | dft (set by method=dft)


@dataclass
class LoraSection:
    r: int = 32
    alpha: int = 64
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    merge: bool = True  # also export a merged full checkpoint


@dataclass
class IWSection:
    temperature: float = 1.0  # T in w = min(exp(T · mean_t[log p_θ − log p_ref]), w_max)
    w_max: float = 16.0
    detach: bool = True


@dataclass
class OSFSection:
    effective_rank: Any = None  # PEFT OSFConfig.effective_rank: frozen top-k; int, fraction of min(m, n), or None (half)
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    merge: bool = True  # also export a merged full checkpoint


@dataclass
class Config:
    method: str = "rpsft"
    output_dir: str = "runs/demo"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    anchor: AnchorConfig = field(default_factory=AnchorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    iw: IWSection = field(default_factory=IWSection)
    osf: OSFSection = field(default_factory=OSFSection)
    trainer: dict = field(default_factory=dict)  # any other SFTConfig field, passed through (rpsft.trainer_args)


# Short spellings users reach for; each maps to its one real key.
ALIASES = {"rank": "anchor.rank", "k": "anchor.rank", "lam": "anchor.lam", "lambda": "anchor.lam",
           "period": "anchor.period", "lr": "train.lr", "max_steps": "train.max_steps", "seed": "train.seed"}


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def section_keys(cls) -> list[str]:
    """Every dotted leaf key of the dataclass ``cls`` (nested dataclass fields are sections), in field order."""
    out = []
    for name, tp in typing.get_type_hints(cls).items():
        out += [f"{name}.{k}" for k in section_keys(tp)] if _is_section(tp) else [name]
    return out


def all_keys() -> list[str]:
    return section_keys(Config)


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Coerce a YAML/CLI value to the field's annotated type, or raise a ConfigError naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [coerce(v, args[0] if args else Any, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if value is None or value == "":
            raise ConfigError(f"{key}: empty value; give a non-empty string")
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def unknown_key(key: str, cls=None, *, label: str = "config", aliases: dict | None = None) -> ConfigError:
    """The error for a key ``cls`` (default :class:`Config`) does not have: the closest valid key or alias, and
    every valid key."""
    keys = section_keys(Config if cls is None else cls)
    aliases = ALIASES if cls in (None, Config) and aliases is None else aliases or {}
    close = difflib.get_close_matches(key, keys + list(aliases), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown {label} key {key!r}{hint} Valid keys: {', '.join(keys)}")


def load_section(cls, mapping: Any, where: str = "", *, label: str = "config", aliases: dict | None = None,
                 _root=None):
    """Build the dataclass ``cls`` from a mapping — the one loader of every config (train, rl, compare).

    Nested dataclass fields are sections (built the same way; an empty section takes its class's defaults), every
    other value is coerced to its field's annotated type (:func:`coerce`), and an unknown key is a ConfigError with
    the closest valid key of the whole config (``label`` names the config in the message: "unknown rl config key
    ..."). ``where`` is the dotted prefix of ``mapping`` inside the file ("" at the top)."""
    root = cls if _root is None else _root
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'}: expected a mapping, got {mapping!r}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in mapping.items():
        key = where + str(k)
        if k not in hints:
            raise unknown_key(key, root, label=label, aliases=aliases)
        tp = hints[k]
        kwargs[k] = load_section(tp, v or {}, key + ".", label=label, aliases=aliases, _root=root) \
            if _is_section(tp) else coerce(v, tp, key)
    return cls(**kwargs)


def parse_value(text: str) -> Any:
    """YAML for a CLI value, plus numbers YAML 1.1 leaves as strings (``1e-6``)."""
    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(v, str):
        for conv in (int, float):
            try:
                return conv(v)
            except ValueError:
                pass
    return v


def apply_overrides(data: dict, overrides: list[str], cls=None, *, label: str = "config",
                    aliases: dict | None = None, free: tuple[str, ...] = ("trainer.", "data.columns."),
                    example: str = "anchor.rank=128") -> dict:
    """Apply ``key=value`` overrides (dotted keys, aliases allowed) to the nested dict of a ``cls`` config (default
    :class:`Config`) in place. Keys under a ``free`` prefix (free-form sections) are checked when the run starts;
    a whole section may be given as a mapping (``--set 'id={limit: 3}'``)."""
    cls = Config if cls is None else cls
    aliases = ALIASES if cls is Config and aliases is None else aliases or {}
    keys = set(section_keys(cls))
    sections = {k.rsplit(".", 1)[0] for k in keys if "." in k}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set {example}")
        key, text = item.split("=", 1)
        key = aliases.get(key.strip(), key.strip())
        if not key.startswith(free) and key not in keys and key not in sections:
            raise unknown_key(key, cls, label=label, aliases=aliases)
        set_dotted(data, key, text, item)
    return data


def set_dotted(data: dict, key: str, text: str, item: str) -> None:
    """``data[a][b][c] = parsed text`` for ``key`` "a.b.c", creating sections; ``item`` is the raw --set text."""
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {p} is not a section")
    node[parts[-1]] = parse_value(text)


def read_config_file(path: str | Path | None, examples: str = "configs/", what: str = "sections") -> dict:
    """The top-level mapping of a YAML config file ({} for no file), with a clear error for each way it can fail:
    the one reader of every YAML file rpsft takes (run configs, compare configs, accelerate configs)."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist (see {examples} for examples)")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of {what}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    data = read_config_file(path)
    apply_overrides(data, overrides or [])
    cfg = load_section(Config, data)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    t, a = cfg.train, cfg.anchor
    checks = [
        (t.lr > 0, f"train.lr must be > 0, got {t.lr}"),
        (t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}"),
        (t.grad_accum >= 1, f"train.grad_accum must be >= 1, got {t.grad_accum}"),
        (t.epochs > 0 or t.max_steps > 0, "set train.epochs > 0 or train.max_steps > 0"),
        *anchor_checks(a),
        (cfg.data.max_length >= 8, f"data.max_length must be >= 8, got {cfg.data.max_length}"),
    ]
    raise_first_failed(checks)
    check_budget_config(a)
    check_values(cfg)  # finiteness, ranges, non-empty paths and targets, rank syntax: before anything loads


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def check_values(cfg: Config) -> None:
    """Ranges and finiteness of every value (``lr=inf`` and ``lam=inf`` included); normalises ``anchor.rank``
    written as a float with an integer value (``1e3`` on the command line) to the int k it means."""
    t, a, d = cfg.train, cfg.anchor, cfg.data
    if isinstance(a.rank, float) and a.rank > 1:
        if not a.rank.is_integer():
            raise ConfigError(f"anchor.rank={a.rank}: give an int k (e.g. 768) or a fraction of min(m, n) in (0, 1]")
        a.rank = int(a.rank)
    checks = [
        (_finite(t.lr), f"train.lr must be a finite number > 0, got {t.lr}"),
        (_finite(a.lam), f"anchor.lam must be a finite number >= 0, got {a.lam}"),
        (_finite(t.epochs) and t.epochs >= 0, f"train.epochs must be a finite number >= 0, got {t.epochs}"),
        (_finite(t.warmup_ratio) and 0 <= t.warmup_ratio < 1 or (t.warmup_ratio >= 1 and
                                                                  float(t.warmup_ratio).is_integer()),
         f"train.warmup_ratio must be a fraction in [0, 1) (or a whole number of steps), got {t.warmup_ratio}"),
        (_finite(t.weight_decay) and t.weight_decay >= 0, f"train.weight_decay must be finite and >= 0, got "
                                                          f"{t.weight_decay}"),
        (_finite(t.max_grad_norm) and t.max_grad_norm >= 0, f"train.max_grad_norm must be finite and >= 0 (0 = no "
                                                            f"clipping), got {t.max_grad_norm}"),
        (t.logging_steps >= 1, f"train.logging_steps must be >= 1, got {t.logging_steps}"),
        *checkpoint_checks(t),
        (t.max_steps == -1 or t.max_steps >= 1, f"train.max_steps must be >= 1 (or -1: use train.epochs), got "
                                                f"{t.max_steps}"),
        *nan_policy_checks(t),
        (d.limit is None or d.limit >= 1, f"data.limit must be >= 1 (first N rows) or null (all rows), got {d.limit}"),
        (bool(str(cfg.output_dir).strip()), "output_dir is empty; give the directory the run is written to"),
        (bool(str(d.train).strip()), "data.train is empty; give a JSONL/JSON file or a hub dataset name"),
        (bool(str(cfg.model.name).strip()), "model.name is empty; give an embedded name, a checkpoint directory or "
                                            "a hub id"),
        (len(a.targets) > 0, "anchor.targets is empty; name at least one module pattern, e.g. q_proj"),
        (a.niter >= 1, f"anchor.niter must be >= 1, got {a.niter}"),
        (cfg.lora.r >= 1, f"lora.r must be >= 1, got {cfg.lora.r}"),
        (_finite(cfg.lora.alpha) and cfg.lora.alpha > 0, f"lora.alpha must be > 0, got {cfg.lora.alpha}"),
        (_finite(cfg.lora.dropout) and 0 <= cfg.lora.dropout < 1, f"lora.dropout must lie in [0, 1), got "
                                                                   f"{cfg.lora.dropout}"),
        (len(cfg.lora.targets) > 0, "lora.targets is empty; name at least one module pattern, e.g. q_proj"),
        (_finite(cfg.iw.temperature), f"iw.temperature must be finite, got {cfg.iw.temperature}"),
        (_finite(cfg.iw.w_max) and cfg.iw.w_max > 0, f"iw.w_max must be finite and > 0, got {cfg.iw.w_max}"),
    ]
    raise_first_failed(checks)
    from .models import parse_dtype

    for key, value in (("model.dtype", cfg.model.dtype), ("anchor.dtype", a.dtype)):
        try:
            parse_dtype(value)
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None
    _check_rank_syntax(a.rank)
    from .selection import parse_layers

    parse_layers(a.layers)


def _check_rank_syntax(rank: Any) -> None:
    """The rank spec's own errors (not a number, a fraction out of range, a missing rank file) without a model."""
    from .selection import SelectionError, resolve_ranks

    if isinstance(rank, dict) or (isinstance(rank, str) and rank.startswith("@")):
        return  # a mapping or a rank file is checked against the real parameter names (check_targets)
    try:
        resolve_ranks([("probe.weight", (4096, 4096))], rank)
    except SelectionError as e:
        raise ConfigError(f"anchor.{e}" if str(e).startswith("rank") else str(e)) from None


SCOPES = ("all", "type")  # of the adaptive λ (one λ per group)
FORMS = ("penalty", "ball")  # anchor.budget_form: adapt λ | project after every optimizer step
BALL_SCOPES = ("all", "type", "matrix")  # of the ball (one scale c per group)


def budget_form(a: Any) -> str:
    """``anchor.budget_form`` of a config section (``penalty`` for objects without the field)."""
    return getattr(a, "budget_form", "penalty")


def check_budget_config(a: Any) -> None:
    """The budget keys of an ``anchor`` config section, checked before anything loads (ConfigError, one line). What
    the run's method allows is checked where the method is known (:func:`rpsft.budget.check_budget_method`)."""
    form = budget_form(a)
    if form not in FORMS:
        raise ConfigError(f"anchor.budget_form must be penalty (adapt λ) or ball (project into the budget), got "
                          f"{form!r}{_did_you_mean(form, FORMS)}")
    if a.budget is None:
        if form == "ball":
            raise ConfigError("anchor.budget_form=ball needs anchor.budget=ε, the radius of the ball (a relative "
                              "drift, e.g. 0.01; 0 keeps the top-k block at W0)")
        return
    eps = a.budget
    ball = form == "ball"
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps < 0 or \
            (eps == 0 and not ball):
        raise ConfigError(f"anchor.budget must be a relative drift ε > 0 (e.g. 0.01 = 1 % of ‖σ_k‖; 0 only with "
                          f"anchor.budget_form=ball), got {eps!r}")
    scopes = BALL_SCOPES if ball else SCOPES
    if a.budget_scope not in scopes:
        raise ConfigError(f"anchor.budget_scope must be all, type or matrix, got {a.budget_scope!r}"
                          f"{_did_you_mean(a.budget_scope, scopes)}" if ball else
                          f"anchor.budget_scope must be all or type (matrix only with anchor.budget_form=ball), got "
                          f"{a.budget_scope!r}{_did_you_mean(a.budget_scope, scopes)}")
    if ball:
        return  # the λ keys below belong to the penalty form
    if not (math.isfinite(a.lam_min) and math.isfinite(a.lam_max)) or a.lam_min <= 0 or a.lam_max < a.lam_min:
        raise ConfigError(f"anchor.lam_min={a.lam_min:g} and anchor.lam_max={a.lam_max:g} admit no λ for the budget: "
                          "need 0 < lam_min <= lam_max (a multiplicative controller cannot leave λ = 0)")
    if not (math.isfinite(a.budget_rate) and a.budget_rate > 0):
        raise ConfigError(f"anchor.budget_rate must be > 0 (λ changes by at most ×e^±rate per step), got "
                          f"{a.budget_rate!r}")


def checkpoint_checks(t: BaseTrainConfig) -> list[tuple[bool, str]]:
    """The `(ok, message)` checks of the checkpoint fields of a ``train:`` section (train, rl)."""
    return [
        (t.save_steps >= 1, f"train.save_steps must be >= 1, got {t.save_steps}"),
        (t.save_total_limit is None or t.save_total_limit >= 1,
         f"train.save_total_limit must be >= 1 or null (keep all), got {t.save_total_limit}"),
        (isinstance(t.keep_optimizer_state, bool),
         f"train.keep_optimizer_state must be true or false, got {t.keep_optimizer_state!r}"),
    ]


def nan_policy_checks(t: BaseTrainConfig) -> list[tuple[bool, str]]:
    """The `(ok, message)` checks of the finite guard's fields of a ``train:`` section (train, rl)."""
    return [
        (t.nan_policy in ("stop", "skip"), f"train.nan_policy must be stop or skip, got {t.nan_policy!r}"),
        (t.nan_max_skips >= 0, f"train.nan_max_skips must be >= 0, got {t.nan_max_skips}"),
    ]


def anchor_checks(a: AnchorConfig) -> list[tuple[bool, str]]:
    """The `(ok, message)` checks of an ``anchor:`` section, shared by every config that has one (train, rl)."""
    return [
        (a.period >= 1, f"anchor.period must be >= 1 (apply every s optimizer steps), got {a.period}"),
        (a.lam >= 0, f"anchor.lam must be >= 0, got {a.lam}"),
        (a.svd in ("exact", "gram", "randomized"), f"anchor.svd must be exact, gram or randomized, got {a.svd!r}"),
        (a.mode in ("auto", "closed_form", "autograd"), f"anchor.mode must be auto, closed_form or autograd, got "
                                                          f"{a.mode!r}"),
        (a.frame_dtype in ("fp32", "bf16", "fp16"), f"anchor.frame_dtype must be fp32, bf16 or fp16, got "
                                                    f"{a.frame_dtype!r}"),
        (a.full_rank in FULL_RANK_RULES, f"anchor.full_rank must be l2 (‖W − W0‖² at k = min(m, n), the paper's "
                                         f"rule) or eq3 (Eq. 3 on the full-rank bases), got {a.full_rank!r}"
                                         + _did_you_mean(a.full_rank, FULL_RANK_RULES)),
    ]


def _did_you_mean(value: Any, choices: tuple[str, ...]) -> str:
    """"; did you mean 'x'?" for the choice closest to ``value`` (case-insensitive), or ""."""
    close = difflib.get_close_matches(str(value).lower(), choices, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def raise_first_failed(checks: list[tuple[bool, str]]) -> None:
    """Raise ConfigError with the message of the first failed ``(ok, message)`` check."""
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
