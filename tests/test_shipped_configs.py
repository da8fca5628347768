"""Every config the project ships loads against the current schema (a renamed key breaks this, not a user)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rpsft.compare.config import load_compare_config
from rpsft.compare.grid import plan_runs
from rpsft.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = [ROOT / "configs" / "demo.yaml", *sorted((ROOT / "configs" / "paper").glob("*.yaml"))]


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_train_configs_load(path):
    cfg = load_config(path)
    assert cfg.train.lr > 0 and cfg.method


def test_paper_recipes_match_the_paper():
    for name, epochs in (("qwen2.5-7b", 12), ("qwen2.5-3b", 12), ("llama3.1-8b", 20)):
        cfg = load_config(ROOT / "configs" / "paper" / f"{name}.yaml")
        assert (cfg.anchor.rank, cfg.anchor.lam, cfg.train.lr, cfg.train.epochs) == (768, 1.0, 1e-6, epochs)
        assert cfg.train.batch_size * cfg.train.grad_accum * 8 == 16 and cfg.train.warmup_ratio == 0.03


def test_compare_demo_plans_every_method(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_compare_config(ROOT / "configs" / "compare-demo.yaml")
    names = [r.name for r in plan_runs(cfg)]
    assert {"sft", "rpsft", "l2init", "dft", "iw", "lora"} <= set(names) and "rpsft-k16" in names


def test_study_plans_the_frontier_grid(monkeypatch):
    monkeypatch.chdir(ROOT)
    runs = plan_runs(load_compare_config(ROOT / "configs" / "study.yaml"))
    fam = {}
    for r in runs:
        fam.setdefault(r.family, []).append(r)
    sft = [r for r in fam["sft"] if r.eval_steps]
    assert len(sft) == 1 and len(sft[0].eval_steps) + 1 >= 4  # SFT's early-stopping curve: >= 4 checkpoints
    assert len(fam["rpsft k=128"]) >= 3 + 1 and len(fam["rpsft k=ranks"]) >= 3 and len(fam["l2init"]) >= 3
    assert {"lora", "dft"} <= set(fam)
    assert len({r.seed for r in fam["sft"]}) == 2 and len({r.seed for r in fam["rpsft k=128"]}) == 2


def test_study_extended_adds_its_runs_and_reuses_the_study(monkeypatch):
    monkeypatch.chdir(ROOT)
    study = {r.name: r for r in plan_runs(load_compare_config(ROOT / "configs" / "study.yaml"))}
    more = {r.name: r for r in plan_runs(load_compare_config(ROOT / "configs" / "study-extended.yaml"))}
    assert set(study) < set(more)  # every study run is re-used as is (same names, so same stages)
    added = {n: more[n] for n in set(more) - set(study)}
    budget = [r for r in added.values() if r.family == "rpsft-budget"]
    eps = sorted(float(o.split("=")[1]) for r in budget for o in r.overrides if o.startswith("anchor.budget="))
    assert eps == [5e-5, 1e-4, 2e-4]
    twin, = [r for r in added.values() if r.family == "rpsft-bf16"]  # λ = 10, k = 128 with bf16 frames
    assert set(twin.overrides) - set(study["rpsft-lam10-k128"].overrides) == {"anchor.frame_dtype=bf16"}
    assert {"l2init-lam0.01", "l2init-lam0.1", "rpsft-lam30-k128"} <= set(added) and len(added) == 7
    assert more["l2init-lam0.1"].family == "l2init" and more["rpsft-lam30-k128"].family == "rpsft k=128"
    assert load_compare_config(ROOT / "configs" / "study-extended.yaml").output_dir == "results/study"


def test_study_mechanism_is_the_2x2_with_three_seeds_and_k_towards_full_rank(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_compare_config(ROOT / "configs" / "study-mechanism.yaml")
    runs = plan_runs(cfg)
    seeds = {}
    for r in runs:
        seeds.setdefault(r.configuration, set()).add(r.seed)
    for cell in ("sft", "rpsft-lam10-k128", "l2init-lam0.1", "complement-lam0.1-k128"):  # the 2x2
        assert seeds[cell] == {42, 43, 44}, cell
    assert {"complement-lam0.03-k128", "complement-lam0.3-k128", "rpsft-lam10-k384", "rpsft-lam10-k576",
            "l2init-lam1"} <= set(seeds)
    study = load_compare_config(ROOT / "configs" / "study.yaml")
    assert cfg.train_set == study.train_set and cfg.id == study.id  # the frontier study's regime, taken whole
    assert cfg.output_dir == "results/study-mechanism" and cfg.blocks


def test_study_mechanism_budget_adds_its_runs_and_reuses_the_mechanism_study(monkeypatch):
    monkeypatch.chdir(ROOT)
    base = {r.name: r for r in plan_runs(load_compare_config(ROOT / "configs" / "study-mechanism.yaml"))}
    cfg = load_compare_config(ROOT / "configs" / "study-mechanism-budget.yaml")
    more = {r.name: r for r in plan_runs(cfg)}
    assert set(base) < set(more) and all(more[n].overrides == base[n].overrides for n in base)
    added = {n: more[n] for n in set(more) - set(base)}
    assert set(added) == {"rpsft-lam30-k128", "rpsft-lam100-k128", "rpsft-ball-eps1e-05-k128",
                          "rpsft-ball-eps4e-05-k128", "rpsft-budget-eps1e-05-k128", "rpsft-budget-eps4e-05-k128"}
    assert all("anchor.budget_form=ball" in added[f"rpsft-ball-eps{e}-k128"].overrides for e in ("1e-05", "4e-05"))
    assert cfg.output_dir == "results/study-mechanism"
    mechanism_pairs = load_compare_config(ROOT / "configs" / "study-mechanism.yaml").pairs
    assert [list(p) for p in cfg.pairs[: len(mechanism_pairs)]] == [list(p) for p in mechanism_pairs]  # its report is the whole study's
    assert all(a in more and b in more for a, b in cfg.pairs)


def test_study_mechanism_sgd_is_the_mechanism_regime_under_plain_sgd(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_compare_config(ROOT / "configs" / "study-mechanism-sgd.yaml")
    mechanism = load_compare_config(ROOT / "configs" / "study-mechanism.yaml")
    assert cfg.train_set == mechanism.train_set and cfg.id == mechanism.id and cfg.blocks
    assert cfg.output_dir == "results/study-mechanism-sgd"  # its own: its runs share names with the AdamW study's
    runs = {r.name: r for r in plan_runs(cfg)}
    assert set(runs) == {"sft", "rpsft-lam3-k128"}
    for r in runs.values():  # the two differ only in the anchor, never in the optimizer
        assert {"train.optim=sgd", "train.lr=0.3"} <= set(r.overrides), r.name
    lam = float(next(o for o in runs["rpsft-lam3-k128"].overrides if o.startswith("anchor.lam=")).split("=")[1])
    assert 0 < 2 * 0.3 * lam < 2  # a penalty step scales A by 1 - 2·lr·λ: inside (-1, 1), so the block contracts
    assert [list(p) for p in cfg.pairs] == [["rpsft-lam3-k128", "sft"]]
