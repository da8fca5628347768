import pytest

from rpsft.eval.generate import HFGenerator
from rpsft.eval.probe import forgetting_probe, forgetting_probes, probe_prompts


def test_shipped_prompts_are_many_and_varied():
    rows = probe_prompts()
    assert len(rows) >= 200  # enough prompts for a bootstrap interval over prompts
    assert len({r["id"] for r in rows}) == len(rows) and len({r["prompt"] for r in rows}) == len(rows)
    assert len({r["category"] for r in rows}) >= 8


@pytest.fixture()
def few_prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "prompt": "Hello there"}\n{"id": "b", "prompt": "What is 2 + 3?"}\n'
                    '{"id": "c", "prompt": "Say something nice."}\n')
    return path


def test_probe_of_a_model_against_itself_is_zero(tiny_dir, few_prompts, tmp_path):
    r = forgetting_probe(str(tiny_dir), str(tiny_dir), max_new_tokens=8, prompts_path=few_prompts,
                         cache_dir=tmp_path / "cache")
    assert r["prompts"] == 3 and r["tokens"] > 0
    assert r["kl"] == pytest.approx(0.0, abs=1e-6)
    assert r["nll_delta"] == pytest.approx(0.0, abs=1e-5) and r["nll_base"] > 0


def test_probe_detects_a_changed_model_and_decodes_base_once(tiny_dir, tiny_perturbed_dir, few_prompts, tmp_path,
                                                             monkeypatch):
    cache = tmp_path / "cache"
    first = forgetting_probe(str(tiny_dir), str(tiny_perturbed_dir), max_new_tokens=8, prompts_path=few_prompts,
                             cache_dir=cache)
    assert first["kl"] > 1e-3 and first["nll_tuned"] != pytest.approx(first["nll_base"])
    assert len(list(cache.glob("*.jsonl"))) == 1

    def boom(*a, **k):
        raise AssertionError("base answers should come from the cache")

    monkeypatch.setattr(HFGenerator, "generate_iter", boom)
    again = forgetting_probes(str(tiny_dir), [str(tiny_perturbed_dir), str(tiny_dir)], max_new_tokens=8,
                              prompts_path=few_prompts, cache_dir=cache)
    assert again[0]["kl"] == pytest.approx(first["kl"], rel=1e-5)
    assert again[1]["kl"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.numerics
def test_cached_base_logprobs_give_the_probe_s_numbers(tmp_path, tiny_model_dir, few_prompts):
    import torch

    from rpsft.compare.stages import cached_probe
    from rpsft.models import load_model

    model, tok = load_model(str(tiny_model_dir))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "tuned")
    tok.save_pretrained(tmp_path / "tuned")
    exact = forgetting_probe(str(tiny_model_dir), str(tmp_path / "tuned"), max_new_tokens=8, prompts_path=few_prompts)
    got = cached_probe(str(tiny_model_dir), str(tmp_path / "tuned"), tmp_path / "cache", 8, str(few_prompts))
    again = cached_probe(str(tiny_model_dir), str(tmp_path / "tuned"), tmp_path / "cache", 8, str(few_prompts))
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1  # computed once, then read
    assert exact["kl"] > 1e-3
    for key in ("kl", "nll_tuned", "nll_base", "nll_delta"):
        assert got[key] == pytest.approx(exact[key], rel=2e-3, abs=1e-4), key  # float16 base log-probs
        assert again[key] == got[key]
    assert [p["id"] for p in got["per_prompt"]] == [p["id"] for p in exact["per_prompt"]]
