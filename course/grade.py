"""python course/grade.py PATH/TO/dsrl.py: grade a student's dsrl.py (and the eval.py beside it), offline, on CPU.

Each exercise is graded by the spec tests of test_dsrl.py that pin its function down with numbers: hand-made
tensors with expected values, and log-probs and gradients on a tiny model built in the test, checked against an
independent computation. Never against the reference implementation. The tests run on the student's file
(DSRL_UNDER_TEST), one line per exercise, then score=K/N; exit code 0 only when every exercise passes.
"""
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_exercises import EXERCISES  # noqa: E402  (one list of exercises for the copy and the grade)

TESTS = os.path.join(os.path.dirname(HERE), "test_dsrl.py")
SPEC_TESTS = {  # exercise number -> the spec tests of test_dsrl.py that grade it
    1: ["test_group_advantages_without_std_is_reward_minus_group_mean", "test_group_advantages_with_unbiased_std",
        "test_group_advantages_with_unequal_group_counts", "test_group_advantages_random_shapes_against_a_plain_python_oracle"],
    2: ["test_sample_masks_nsr_psr_all", "test_sample_masks_random_advantages_against_a_plain_python_oracle"],
    3: ["test_logprob_y_given_x_equals_models_own_cross_entropy", "test_shared_prompt_forward_equals_separate_forwards",
        "test_temperature_divides_logits_given_x", "test_logprob_y_given_x_continues_positions_after_the_prompt",
        "test_logprob_y_given_x_gradient_equals_token_by_token_decoding",
        "test_logprob_y_given_x_memory_stays_flat_in_vocabulary_times_length"],
    4: ["test_logprob_y_equals_hand_built_start_token_forward", "test_temperature_divides_logits_in_p_y",
        "test_logprob_y_gradient_equals_token_by_token_decoding", "test_logprob_y_memory_stays_flat_in_vocabulary_times_length"],
    5: ["test_ppo_clip_loss_is_minus_advantage_at_ratio_one_and_clips_otherwise",
        "test_ppo_clip_with_ratios_below_and_above_one_and_asymmetric_clip", "test_ppo_clip_random_ratios_against_a_plain_python_oracle"],
    6: ["test_token_mean_loss_hand_values", "test_token_mean_random_masks_against_a_plain_python_oracle"],
    7: ["test_phase_for_step_warmup_boundary", "test_phase_record_holds_std_and_coefficient"],
    8: ["test_pass_at_k_hand_values", "test_pass_at_k_random_against_subset_enumeration"],
}


def run_spec_tests(dsrl_path: str, names: list) -> dict:
    """Run the named tests on the student's file in a fresh process -> {test name: None (passed) or message}."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.xml")
        env = {**os.environ, "DSRL_UNDER_TEST": os.path.abspath(dsrl_path), "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TESTS, "-k", " or ".join(names),
                        f"--junitxml={report}"], env=env, cwd=tmp, capture_output=True, text=True, timeout=600)
        if not os.path.exists(report):
            return {name: "the tests could not run (does the file import?)" for name in names}
        results = {}
        for case in ET.parse(report).iter("testcase"):
            problem = case.find("failure") if case.find("failure") is not None else case.find("error")
            results[case.get("name").split("[")[0]] = None if problem is None else first_line(problem.get("message"))
        return results


def first_line(message) -> str:
    """The assertion's own message (or the exception), without pytest's expression dump."""
    text = (message or "failed").split("\nassert ")[0].strip()
    return " ".join(text.replace("AssertionError: ", "").split())[:240]


def grade(dsrl_path: str, only=None) -> int:
    chosen = [e for e in EXERCISES if only is None or e[0] in only]
    results = run_spec_tests(dsrl_path, [t for n, *_ in chosen for t in SPEC_TESTS[n]])
    score = 0
    for n, _, name, _ in chosen:
        failures = [results.get(t, "not run") for t in SPEC_TESTS[n] if results.get(t, "not run") is not None]
        print(f"exercise {n} {name}: " + ("PASS" if not failures else f"FAIL ({failures[0]})"))
        score += not failures
    print(f"score={score}/{len(chosen)}")
    return 0 if score == len(chosen) else 1


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    only = [int(a) for a in argv[2:]] if len(argv) > 2 and argv[1] == "--only" else None
    if not argv or not os.path.isfile(argv[0]) or (len(argv) > 1 and only is None):
        print("usage: python course/grade.py PATH/TO/dsrl.py [--only N ...]  (eval.py is read beside it)",
              file=sys.stderr)
        return 2
    return grade(argv[0], only)


if __name__ == "__main__":
    sys.exit(main())
