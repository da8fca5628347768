import json

import pytest

from rpsft.eval import run_eval
from rpsft.eval.generate import HFGenerator
from rpsft.fileio import read_jsonl


def _gen(tiny_dir, eval_dir, out, **kw):
    args = dict(suites="aime24,gpqa_test", k=2, out_dir=out, max_new_tokens=6, batch_size=4, eval_dir=eval_dir)
    args.update(kw)
    return run_eval(str(tiny_dir), **args)


def test_run_writes_samples_and_summary(tiny_dir, eval_dir, tmp_path):
    calls = []
    s = _gen(tiny_dir, eval_dir, tmp_path / "o", progress=lambda d, a, b: calls.append((d, a, b)))
    rows = read_jsonl(tmp_path / "o" / "samples.jsonl")
    assert len(rows) == 3 * 2 + 3 * 2 and s["generated_now"] == 12
    assert {(r["benchmark"], r["index"], r["sample"]) for r in rows} == \
        {(b, i, j) for b in ("aime24", "gpqa_test") for i in range(3) for j in range(2)}
    r = rows[0]
    assert {"prompt", "completion", "extracted", "correct", "gold", "n_tokens", "finish"} <= set(r)
    assert 1 <= r["n_tokens"] <= 6
    b = s["benchmarks"]["aime24"]
    assert b["k"] == 2 and b["problems"] == 3 and 0.0 <= b["avg_at_k"] <= b["pass_at_k"] <= 1.0
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["benchmarks"].keys() == {"aime24", "gpqa_test"}
    assert calls[-1][1] == calls[-1][2] == 12  # progress reached the total
    assert s["groups"]["id"]["benchmarks"] == ["aime24"]


def test_resume_generates_only_what_is_missing(tiny_dir, eval_dir, tmp_path):
    out = tmp_path / "o"
    first = _gen(tiny_dir, eval_dir, out, greedy=True)
    again = _gen(tiny_dir, eval_dir, out, greedy=True)
    assert again["generated_now"] == 0 and again["benchmarks"] == first["benchmarks"]
    # simulate a crash: two finished lines lost and a torn last line
    path = out / "samples.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-2]) + "\n" + lines[-2][:15])
    resumed = _gen(tiny_dir, eval_dir, out, greedy=True)
    assert resumed["generated_now"] == 2
    assert resumed["benchmarks"] == first["benchmarks"]  # greedy: the regenerated samples are the same
    assert len({(r["benchmark"], r["index"], r["sample"]) for r in read_jsonl(path)}) == 6


def test_larger_k_extends_existing_samples(tiny_dir, eval_dir, tmp_path):
    out = tmp_path / "o"
    _gen(tiny_dir, eval_dir, out, suites="aime24", k=1)
    s = _gen(tiny_dir, eval_dir, out, suites="aime24", k=3)
    assert s["generated_now"] == 3 * 2 and s["benchmarks"]["aime24"]["k"] == 3


def test_changed_settings_refuse_to_mix_samples(tiny_dir, eval_dir, tmp_path):
    out = tmp_path / "o"
    _gen(tiny_dir, eval_dir, out, suites="aime24", k=1)
    with pytest.raises(RuntimeError, match="other settings"):
        _gen(tiny_dir, eval_dir, out, suites="aime24", k=1, max_new_tokens=7)


def test_verdicts_flow_into_metrics(tiny_dir, eval_dir, tmp_path, monkeypatch):
    """A generator that answers right on a problem's first sample only: avg@2 = 1/2, pass@2 = 1."""
    answers = {"What is 2 + 3?": "5", "What is half of 1?": "0.5", "What is 6 * 7?": "42"}
    seen: dict[str, int] = {}

    def right_then_wrong(self, texts, **kw):
        batch = []
        for j, t in enumerate(texts):
            q = next(q for q in answers if q in t)
            seen[q] = seen.get(q, 0) + 1
            text = f"so \\boxed{{{answers[q]}}}" if seen[q] == 1 else "\\boxed{-1}"
            batch.append((j, {"text": text, "n_tokens": 3, "finish": "stop"}))
        yield batch

    monkeypatch.setattr(HFGenerator, "generate_iter", right_then_wrong)
    s = _gen(tiny_dir, eval_dir, tmp_path / "o", suites="aime24", k=2)
    b = s["benchmarks"]["aime24"]
    assert b["avg_at_k"] == 0.5 and b["pass_at_k"] == 1.0 and b["answered"] == 1.0
    rows = read_jsonl(tmp_path / "o" / "samples.jsonl")
    assert sorted(r["extracted"] for r in rows if r["correct"]) == ["0.5", "42", "5"]


def test_unbiased_pass_at_k_with_n_above_k(tiny_dir, eval_dir, tmp_path):
    s = _gen(tiny_dir, eval_dir, tmp_path / "o", suites="aime24", k=1, n=3)
    b = s["benchmarks"]["aime24"]
    assert b["n"] == 3 and "pass_at_k_unbiased" in b and s["generated_now"] == 9


def test_loglik_mode(tiny_dir, eval_dir, tmp_path):
    s = run_eval(str(tiny_dir), "gpqa_test,aime24", loglik=True, out_dir=tmp_path / "ll", eval_dir=eval_dir)
    assert "aime24" in s["skipped"] and list(s["benchmarks"]) == ["gpqa_test"]
    b = s["benchmarks"]["gpqa_test"]
    assert b["problems"] == 3 and b["chance"] == 0.25 and 0 <= b["acc_norm"] <= 1
    rows = read_jsonl(tmp_path / "ll" / "samples.jsonl")
    assert len(rows[0]["letter_scores"]) == 4 and all(x < 0 for x in rows[0]["text_scores"])
    again = run_eval(str(tiny_dir), "gpqa_test", loglik=True, out_dir=tmp_path / "ll", eval_dir=eval_dir)
    assert again["generated_now"] == 0 and again["benchmarks"]["gpqa_test"] == b


def test_lm_eval_protocol(tiny_dir, eval_dir, tmp_path):
    out = tmp_path / "lm"
    s = run_eval(str(tiny_dir), "gpqa_test,aime24", mc_protocol="lm-eval", out_dir=out, eval_dir=eval_dir)
    assert s["mc_protocol"] == "lm-eval" and s["mode"] == "loglik" and "aime24" in s["skipped"]
    b = s["benchmarks"]["gpqa_test"]
    assert b["mc_protocol"] == "lm-eval" and b["acc_letter"] is None and b["acc"] == b["acc_text"]
    rows = read_jsonl(out / "samples.jsonl")
    assert all(r["context"].startswith("Question: ") and r["context"].endswith("\nAnswer:") for r in rows)
    assert "Choices:" not in rows[0]["context"] and "letter_scores" not in rows[0]
    assert b["acc_norm"] == sum(r["correct_norm"] for r in rows) / 3
    # the protocol defines what a sample is: the paper protocol is refused in the same directory
    with pytest.raises(RuntimeError, match="mc_protocol"):
        run_eval(str(tiny_dir), "gpqa_test", loglik=True, out_dir=out, eval_dir=eval_dir)
    paper = run_eval(str(tiny_dir), "gpqa_test", loglik=True, out_dir=tmp_path / "paper", eval_dir=eval_dir)
    assert paper["mc_protocol"] == "paper" and paper["benchmarks"]["gpqa_test"]["mc_protocol"] == "paper"


def test_run_json_without_mc_protocol_still_resumes(tiny_dir, eval_dir, tmp_path):
    out = tmp_path / "ll"
    run_eval(str(tiny_dir), "gpqa_test", loglik=True, out_dir=out, eval_dir=eval_dir)
    cfg = json.loads((out / "run.json").read_text())
    del cfg["mc_protocol"]  # written before the key existed: it was the paper protocol
    (out / "run.json").write_text(json.dumps(cfg))
    assert run_eval(str(tiny_dir), "gpqa_test", loglik=True, out_dir=out, eval_dir=eval_dir)["generated_now"] == 0


def test_unknown_mc_protocol_is_refused(tiny_dir, eval_dir, tmp_path):
    with pytest.raises(ValueError, match="mc_protocol must be one of paper, lm-eval"):
        run_eval(str(tiny_dir), "gpqa_test", mc_protocol="harness", out_dir=tmp_path / "x", eval_dir=eval_dir)
    with pytest.raises(ValueError, match="--mc-protocol lm-eval .*--backend hf"):
        run_eval(str(tiny_dir), "gpqa_test", mc_protocol="lm-eval", backend="vllm", out_dir=tmp_path / "x",
                 eval_dir=eval_dir)


def test_probe_suite_needs_a_base(tiny_dir, eval_dir, tmp_path):
    with pytest.raises(ValueError, match="probe-base"):
        run_eval(str(tiny_dir), "probe", out_dir=tmp_path / "p", eval_dir=eval_dir)


def test_vllm_backend_fails_clearly_without_vllm(tiny_dir, eval_dir, tmp_path):
    pytest.importorskip("torch")
    try:
        import vllm  # noqa: F401
        pytest.skip("vllm is installed here")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match="--backend hf"):
        _gen(tiny_dir, eval_dir, tmp_path / "v", suites="aime24", k=1, backend="vllm")
