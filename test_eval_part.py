"""Tests for eval.py (to be merged into test_dsrl.py): metrics on hand-computed values, the SEAL behaviour
counter on hand-written responses, gradient alignment against an independent computation, and a subprocess
run of every subcommand on the tiny model.  Run:  python -m pytest -q test_eval_part.py
"""
import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from test_dsrl import make_tiny_model, tiny_model_dir, tiny_data, tiny, run_cli, read_jsonl, problem_rows, write_parquet  # noqa: F401

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import dsrl  # noqa: E402
import eval as evaluator  # noqa: E402  (our eval.py, not the builtin function)

SHARED_DATA = os.path.join(HERE, "..", "shared", "data")


def repeated_benchmark(path, n_unique=3, copies=3):
    """A verl-format parquet where every problem appears `copies` times, like the official *_20times files."""
    rows = problem_rows(n_unique)
    for i, r in enumerate(rows):
        r["prompt"][-1]["content"] += f" (problem {i})"  # problem_rows repeats texts; make each one unique
    return write_parquet([r for _ in range(copies) for r in rows], path)


# ----------------------------------------------------------------------------------------------------
# accuracy metrics
# ----------------------------------------------------------------------------------------------------
def test_pass_at_k_hand_values():
    assert evaluator.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert evaluator.pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert evaluator.pass_at_k(4, 1, 4) == 1.0  # k = n: any right sample counts
    assert evaluator.pass_at_k(4, 0, 4) == 0.0  # c = 0
    assert evaluator.pass_at_k(4, 4, 1) == 1.0
    assert evaluator.pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    for n, c, k in [(20, 3, 4), (32, 5, 16), (32, 31, 2)]:  # the stable product equals the binomial form
        assert evaluator.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_k_values():
    assert evaluator.k_values(1) == [1]
    assert evaluator.k_values(32) == [1, 2, 4, 8, 16, 32]
    assert evaluator.k_values(20) == [1, 2, 4, 8, 16, 20]


def test_majority_vote_tie_goes_to_earliest_answer():
    assert evaluator.majority_correct(["3", "5", "5", "3"], [0.0, 1.0, 1.0, 0.0]) == 0.0  # 2-2 tie: "3" came first
    assert evaluator.majority_correct(["5", "3", "3", "5"], [1.0, 0.0, 0.0, 1.0]) == 1.0
    assert evaluator.majority_correct([None, None, "7", "2", "2"], [0.0, 0.0, 1.0, 0.0, 0.0]) == 0.0  # no-box does not vote
    assert evaluator.majority_correct([None, None], [0.0, 0.0]) == 0.0


def test_accuracy_metrics_hand_values():
    rewards = [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]  # problem 0: c=1 of 4; problem 1: c=0
    answers = [["2", "1", "1", None], [None, "3", "4", "4"]]
    m = evaluator.accuracy_metrics(rewards, answers, [[10, 20, 30, 40]] * 2, [[False] * 3 + [True]] * 2, k=4)
    assert m["avg@4"] == pytest.approx(1 / 8)
    assert (m["pass@1"], m["pass@2"], m["pass@4"]) == pytest.approx((0.125, 0.25, 0.5))
    assert m["maj@4"] == 0.0 and m["n_problems"] == 2 and m["n_samples"] == 8
    assert m["response_len_mean"] == 25 and m["truncated_frac"] == 0.25


def test_extracted_answer_is_normalised():
    assert evaluator.extracted_answer("so \\boxed{\\dfrac{1}{2}}") == evaluator.extracted_answer("\\boxed{\\frac{1} {2}}")
    assert evaluator.extracted_answer("no box") is None
    assert evaluator.gold_text(27.0) == "27" and evaluator.gold_text(2.5) == "2.5" and evaluator.gold_text(" 7 ") == "7"


def test_benchmark_files_are_deduplicated(tmp_path):
    name, examples, dropped = evaluator.load_benchmark(repeated_benchmark(str(tmp_path / "rep.parquet")))
    assert (name, len(examples), dropped) == ("rep", 3, 6)
    assert [e["answer"] for e in examples] == [r["reward_model"]["ground_truth"] for r in problem_rows(3)]
    assert len(evaluator.load_benchmark(str(tmp_path / "rep.parquet"), limit=2)[1]) == 2
    jsonl = tmp_path / "pa.jsonl"  # problem+answer format
    jsonl.write_text("".join(json.dumps({"problem": p, "answer": a}) + "\n" for p, a in [("1+1?", 2), ("2+2?", 4)] * 4))
    _, examples, dropped = evaluator.load_benchmark(str(jsonl))
    assert [e["answer"] for e in examples] == ["2", "4"] and dropped == 6


def test_official_aime24_file_has_30_problems():
    path = os.path.join(SHARED_DATA, "aime_2024_20times.parquet")
    if not os.path.exists(path):
        pytest.skip(f"official validation file not present: {path}")
    name, examples, dropped = evaluator.load_benchmark(path)
    assert (len(examples), dropped) == (30, 570)


def test_evaluate_accuracy_as_the_trainer_calls_it(tiny, tmp_path):
    model, tok = tiny
    bench = repeated_benchmark(str(tmp_path / "b.parquet"))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    res = evaluator.evaluate_accuracy(model, tok, [bench], k=2, max_new_tokens=12, temperature=1.0, top_p=1.0,
                                      dtype=torch.float32, gen_batch_size=0, reward="math",
                                      samples_path=str(tmp_path / "s.jsonl"))
    assert torch.equal(torch.get_rng_state(), before)  # the training run's random stream is untouched
    m = res["b"]
    assert m["n_problems"] == 3 and set(m) >= {"avg@2", "pass@1", "pass@2", "maj@2", "response_len_mean", "truncated_frac"}
    rows = read_jsonl(str(tmp_path / "s.jsonl"))
    assert len(rows) == 6 and m["avg@2"] == pytest.approx(sum(r["reward"] for r in rows) / 6)


# ----------------------------------------------------------------------------------------------------
# behaviours
# ----------------------------------------------------------------------------------------------------
RESPONSE = ("Let's first find x.\n\n"              # subgoal
            "Wait, that is wrong.\n  \n"          # reflection (starts with Wait), backtracking; blank line with spaces
            "Alternatively, try another way.\n\n"  # transition
            "Let me check: 2+2=4, it's correct.\n\n"  # reflection (two phrases, counted once), verification
            "Case 1: x=1. Case 2: x=2.\n\n"       # enumeration
            "WAIT. Another approach is faster.\n\n"  # reflection wins over transition; backtracking
            "So the answer is \\boxed{4}.")


def test_behaviour_counts_on_a_hand_written_response():
    assert evaluator.split_steps(RESPONSE)[1] == "Wait, that is wrong."
    assert evaluator.count_behaviours(RESPONSE) == {"steps": 7, "reflection": 3, "transition": 1, "subgoal_setting": 1,
                                                    "enumeration": 1, "verification": 1, "backtracking": 2}
    assert evaluator.step_kind("I will wait here.") is None  # SEAL: "wait" counts only at the start
    assert evaluator.step_kind("We can think differently.") == "transition"
    assert evaluator.count_behaviours("")["steps"] == 0


def test_behaviours_summary_splits_correct_incorrect_and_steps():
    rows = [{"step": 1, "response": RESPONSE, "reward": 1.0}, {"step": 1, "response": "Wait.", "reward": 0.0},
            {"step": 2, "response": "Alternatively, x.\n\nWait.", "reward": 0.0}]
    s = evaluator.behaviours_summary(rows)
    assert s["all"]["n_responses"] == 3 and s["all"]["reflection"] == pytest.approx((3 + 1 + 1) / 3)
    assert s["correct"]["reflection"] == 3 and s["incorrect"]["reflection"] == 1
    assert s["incorrect"]["transition"] == 0.5
    assert [(r["step"], r["n_responses"], r["transition"]) for r in s["per_step"]] == [(1, 2, 0.5), (2, 1, 1.0)]


# ----------------------------------------------------------------------------------------------------
# align: gradients in the two spaces against an independent computation
# ----------------------------------------------------------------------------------------------------
def reference_grad(model, context, response):
    """Gradient of sum_t log pi(y_t | context, y_<t) from the model's own full-vocabulary logits."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=torch.tensor([context + response])).logits[0, len(context) - 1:-1]  # (T, V)
    (-F.cross_entropy(logits, torch.tensor(response), reduction="sum")).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return g


def test_alignment_equals_independent_gradients(tiny):
    model, tok = tiny
    prompt = dsrl.build_prompt(tok, problem_rows(1)[0]["prompt"], 512)
    response = tok("\\boxed{2}<|im_end|>", add_special_tokens=False)["input_ids"]
    start = dsrl.token_id(tok, dsrl.START_TOKEN)
    buf = torch.zeros(sum(p.numel() for p in model.parameters()))
    stats, lx, ly = evaluator.rollout_alignment(model, prompt, response, start, dsrl.pad_id(tok), 1.0, 3, buf)
    gx, gy = reference_grad(model, prompt, response), reference_grad(model, [start], response)
    assert torch.allclose(buf, gx, rtol=1e-4, atol=1e-5)
    assert stats["inner"] == pytest.approx(torch.dot(gx, gy).item(), rel=1e-4)
    assert stats["cosine"] == pytest.approx(F.cosine_similarity(gx, gy, dim=0).item(), rel=1e-4, abs=1e-6)
    assert stats["norm_y"] == pytest.approx(gy.norm().item(), rel=1e-4)
    assert abs(stats["cosine"]) < 0.99  # the two spaces give different gradients
    assert lx.shape == ly.shape == (len(response),) and not torch.allclose(lx, ly)
    assert all(p.grad is None for p in model.parameters())  # nothing left behind between rollouts


def test_cosine_of_a_gradient_with_itself_is_one(tiny):
    model, tok = tiny
    prompt = dsrl.build_prompt(tok, problem_rows(1)[0]["prompt"], 512)
    response = tok("\\boxed{1}<|im_end|>", add_special_tokens=False)["input_ids"]
    buf = torch.zeros(sum(p.numel() for p in model.parameters()))
    for into in (True, False):
        logp, mask = dsrl.logprob_y_given_x(model, [prompt], [response], dsrl.pad_id(tok))
        logp[mask].sum().backward()
        if into:
            evaluator.flat_grad_into(model, buf)
        else:
            dot, sq = evaluator.grad_dot(model, buf)
    assert dot / (buf.norm().item() * math.sqrt(sq)) == pytest.approx(1.0, abs=1e-5)


def test_token_agreement_hand_values():
    lx = [torch.log(torch.tensor([0.95, 0.2, 0.6]))]
    ly = [torch.log(torch.tensor([0.95, 0.1, 0.6]))]
    t = evaluator.token_agreement(lx, ly)
    assert t["tokens"] == 3 and t["tokens_p_gt_0.9"] == 1 and t["tokens_p_lt_0.5"] == 1
    assert t["absdiff_p_gt_0.9"] == pytest.approx(0.0, abs=1e-6) and t["absdiff_p_lt_0.5"] == pytest.approx(math.log(2))
    assert t[f"absdiff_late_ge_{evaluator.EARLY_TOKENS}"] is None  # no late tokens: None, not NaN


# ----------------------------------------------------------------------------------------------------
# The real command line on the tiny model
# ----------------------------------------------------------------------------------------------------
def test_cli_accuracy(tiny_model_dir, tmp_path):
    bench = repeated_benchmark(str(tmp_path / "rep.parquet"))
    out = tmp_path / "acc"
    r = run_cli(["accuracy", "--model", tiny_model_dir, "--benchmarks", bench, "--k", 4, "--max-new-tokens", 16,
                 "--device", "cpu", "--output", out], script="eval.py")
    assert r.returncode == 0, r.stderr
    assert "| rep | 3 |" in r.stdout and "pass@4" in r.stdout
    m = json.load(open(out / "accuracy.json"))["results"]["rep"]
    rows = read_jsonl(str(out / "accuracy_samples.jsonl"))
    assert m["n_problems"] == 3 and m["duplicates_dropped"] == 6 and len(rows) == 12  # de-duplicated: 3 x k, not 9 x k
    assert set(rows[0]) >= {"benchmark", "problem_index", "response", "gold", "extracted", "reward", "outcome",
                            "length", "truncated"}
    assert m["avg@4"] == pytest.approx(sum(x["reward"] for x in rows) / 12) == pytest.approx(m["pass@1"])
    per_problem = [[x["reward"] for x in rows if x["problem_index"] == p] for p in range(3)]
    assert m["pass@4"] == pytest.approx(sum(max(rs) for rs in per_problem) / 3)
    assert 0 < m["avg@4"] < 1  # the tiny model answers 1 or 2 at random


def test_cli_behaviours(tmp_path):
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"step": s, "prompt_index": 0, "response": RESPONSE, "gold": "4",
                                           "reward": float(s == 1), "advantage": 0.0, "used_in_loss": True}) + "\n"
                               for s in (1, 2)))
    r = run_cli(["behaviours", "--samples", samples, "--output", tmp_path / "beh"], script="eval.py")
    assert r.returncode == 0, r.stderr
    s = json.load(open(tmp_path / "beh" / "behaviours.json"))
    assert s["all"]["reflection"] == 3 and s["correct"]["n_responses"] == 1 and len(s["per_step"]) == 2
    assert "| all | 2 |" in r.stdout and "| group |" in r.stdout and (tmp_path / "beh" / "behaviours.md").read_text().strip() == r.stdout.strip()


def test_cli_align(tiny_model_dir, tmp_path):
    bench = repeated_benchmark(str(tmp_path / "rep.parquet"))
    r = run_cli(["align", "--model", tiny_model_dir, "--benchmark", bench, "--rollouts", 4, "--max-new-tokens", 12,
                 "--device", "cpu", "--output", tmp_path / "al"], script="eval.py")
    assert r.returncode == 0, r.stderr
    s = json.load(open(tmp_path / "al" / "align.json"))
    rows = read_jsonl(str(tmp_path / "al" / "align_rollouts.jsonl"))
    assert s["rollouts"] == len(rows) == 4 and sorted({x["problem_index"] for x in rows}) == [0, 1, 2]
    assert all(-1 <= x["cosine"] <= 1 and x["norm_x"] > 0 for x in rows)
    assert s["negative_frac"] == sum(x["inner"] < 0 for x in rows) / 4 and s["tokens"] == sum(x["length"] for x in rows)


def write_run(run_dir, phases):
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as fh:
        for step, phase in enumerate(phases, 1):
            fh.write(json.dumps({"step": step, "phase": phase, "reward_mean": step / 10, "solved_all": 1, "solved_none": 0,
                                 "response_len_mean": 10.0 + step, "loss": 0.1, "grad_norm": 0.5,
                                 "eval/amc23/avg@4": 0.2}) + "\n")
    with open(os.path.join(run_dir, "samples.jsonl"), "w") as fh:
        for step in range(1, len(phases) + 1):
            fh.write(json.dumps({"step": step, "response": RESPONSE, "reward": 1.0}) + "\n")


def test_cli_plot(tmp_path):
    pytest.importorskip("matplotlib")
    write_run(str(tmp_path / "dsrl"), ["warmup", "warmup", "rl", "rl"])
    write_run(str(tmp_path / "grpo"), ["rl"] * 4)
    assert evaluator.handover_step(read_jsonl(str(tmp_path / "dsrl" / "metrics.jsonl"))) == 3
    with open(tmp_path / "grpo" / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "rew')  # a run still writing: the torn last line is skipped
    r = run_cli(["plot", tmp_path / "dsrl", tmp_path / "grpo", "--out", tmp_path / "plots"], script="eval.py")
    assert r.returncode == 0, r.stderr
    for name in ("reward", "solved", "response_length", "loss", "eval", "behaviours"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000


def test_plot_without_matplotlib_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    write_run(str(tmp_path / "run"), ["rl"])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert evaluator.main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "p")]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err


def test_cli_bad_input_is_one_line(tmp_path):
    r = run_cli(["behaviours", "--samples", tmp_path / "missing.jsonl"], script="eval.py")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    r = run_cli(["accuracy", "--model", "x", "--k", 0], script="eval.py")
    assert r.returncode == 2 and "--k" in r.stderr and "Traceback" not in r.stderr
