"""The cost of bit-identical runs on CPU: the P(y|x) loss + backward pass, three ways, measured alternately.

    python bench/determinism_cost.py [--model-dir DIR] [--repeats 25]

  before       the shared prompt's KV cache selected per sample by the cache's own batch_select_indices
               (fancy indexing: its backward, index_put with accumulate, adds in a thread-dependent order)
  now          dsrl.py's index_select (a deterministic backward)
  now + det    the same with torch.use_deterministic_algorithms(True) (what --deterministic turns on)
Model: the tiny Qwen3 of test_dsrl.py; 8 prompts x 8 samples x 24 tokens, micro-batch 8, 2 threads.
Prints the minimum and lower quartile of each (robust to other load on the machine).
"""
import argparse
import os
import random
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dsrl  # noqa: E402


def previous_logprob_y_given_x():
    """dsrl.logprob_y_given_x with the cache's own batch_select_indices, as before the fix."""
    source = open(os.path.join(ROOT, "dsrl.py")).read()
    body = source[source.index("def logprob_y_given_x"):source.index("def logprob_y(")]
    fix = ("    for layer in prefix[cache_key].layers:\n"
           "        layer.keys, layer.values = layer.keys.index_select(0, idx), layer.values.index_select(0, idx)\n")
    assert fix in body, "dsrl.logprob_y_given_x changed; update this benchmark"
    namespace = dict(vars(dsrl))
    exec(body.replace(fix, "    prefix[cache_key].batch_select_indices(idx)\n"), namespace)
    return namespace["logprob_y_given_x"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default="", help="a saved tiny model (default: build one with test_dsrl.py)")
    p.add_argument("--repeats", type=int, default=25)
    a = p.parse_args()
    torch.set_num_threads(2)
    model_dir = a.model_dir or __import__("test_dsrl").make_tiny_model(tempfile.mkdtemp())
    model, tok = dsrl.load_model_and_tokenizer(model_dir)
    rng = random.Random(0)
    prompts = [dsrl.build_prompt(tok, [{"role": "user", "content": f"What is {i}+1?"}], 512) for i in range(8)]
    batch = dsrl.Batch([p for p in prompts for _ in range(8)], [[rng.randrange(3, 90) for _ in range(24)]
                       for _ in range(64)], torch.randn(64), torch.ones(64, dtype=torch.bool))
    args, phase = dsrl.Args(micro_batch_size=8, dtype="float32", device="cpu"), dsrl.Phase("y|x", "all", True, 1.0, "rl")
    start, pad = dsrl.token_id(tok, "<|im_start|>"), dsrl.pad_id(tok)
    variants = {"before (batch_select_indices)": (previous_logprob_y_given_x(), False),
                "now (index_select)": (dsrl.logprob_y_given_x, False), "now + --deterministic": (dsrl.logprob_y_given_x, True)}
    times = {name: [] for name in variants}
    for _ in range(a.repeats):
        for name, (fn, deterministic) in variants.items():
            dsrl.logprob_y_given_x = fn
            torch.use_deterministic_algorithms(deterministic)
            model.zero_grad(set_to_none=True)
            t = time.perf_counter()
            dsrl.policy_loss_backward(model, batch, phase, args, start, pad)
            times[name].append(time.perf_counter() - t)
    for name, ts in times.items():
        ts.sort()
        print(f"{name}: min {ts[0] * 1000:.1f} ms, lower quartile {ts[len(ts) // 4] * 1000:.1f} ms")


if __name__ == "__main__":
    main()
