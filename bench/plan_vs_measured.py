"""The memory plan (scale.py) against measured peaks, part by part, on CPU with the real Qwen3-0.6B configuration.

    python bench/plan_vs_measured.py                 # all parts (about 15 min and 12 GB of RAM at one thread)
    python bench/plan_vs_measured.py --parts kv,loss --response-tokens 512

Random weights, fp32 (the sampling copy: bf16). Each part runs in a FRESH child process that builds what it
needs, resets the kernel's peak-RSS counter (`echo 5 > /proc/self/clear_refs`, Linux) and reports the peak
(VmHWM) or the steady RSS above its baseline, as bench/logprob_memory.py does:
  state         weights + gradients + AdamW moments after one optimizer step (steady RSS above the imports)
  copy          generation_copy(model, bfloat16): the sampler's bf16 copy (steady RSS above the fp32 model)
  kv            sample_responses at a small sampling batch, every response forced to full length (peak)
  loss          logprob_y_given_x + backward of one micro-batch of 1 x (128 prompt + 896 response) = 1,024
  loss+ckpt     tokens, after a short pass that allocates the gradients (peak); the same with checkpointing
The plan's number for each part is scale.memory_plan's, at the same settings.

RSS counts what the C allocator keeps, not only what torch holds. By default glibc raises its mmap threshold after
the first large free (up to 32 MB), so later tensors of a few MB come from the heap and their pages stay with the
process after torch frees them: the peak RSS then counts freed temporaries as well. The children therefore run with
MALLOC_MMAP_THRESHOLD_=131072 (fixed: every large tensor is its own mapping, returned on free), which makes RSS
follow the live tensors, as torch.cuda.max_memory_allocated does on GPU; `--mmap-threshold 0` keeps glibc's default.
"""
import argparse
import ctypes
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
MiB = 2 ** 20


def qwen3_06b_config():
    from transformers import Qwen3Config
    return Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                       rope_theta=1000000, max_position_embeddings=40960, pad_token_id=151643,
                       eos_token_id=151645, bos_token_id=None)


def rss_kb(key="VmRSS"):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key + ":"))


def reset_peak():
    """Give the allocator's free pages back first (a warm-up's freed tensors would otherwise be reused unseen and
    hide part of the peak), then VmHWM := VmRSS. -> the RSS to measure from, in kB"""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return rss_kb()


def settings(a):
    """Args for the plan, at the sizes the children measure."""
    import dsrl
    return dsrl.Args(group_size=a.group_size, prompts_per_step=a.gen_prompts,
                     gen_batch_size=a.gen_prompts * a.group_size, max_prompt_tokens=a.prompt_tokens,
                     max_new_tokens=a.gen_tokens, micro_batch_size=1, logprob_chunk=a.chunk, device="cpu",
                     dtype="float32")


def child(part, a):
    import torch
    import dsrl
    from transformers import Qwen3ForCausalLM
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = rss_kb()
    model = Qwen3ForCausalLM(qwen3_06b_config())
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(3, 151_000, (n,), generator=g).tolist()  # noqa: E731
    if part == "state":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
        model(input_ids=torch.tensor([ids(8)]), labels=torch.tensor([ids(8)])).loss.backward()
        optimizer.step()  # AdamW's moments exist from the first step on; the gradients stay (as during the loss)
        return {"measured": (rss_kb() - base) * 1024}
    if part == "copy":
        before = rss_kb()
        copy = dsrl.generation_copy(model, torch.bfloat16)
        assert copy is not model
        return {"measured": (rss_kb() - before) * 1024}
    if part == "kv":
        tok = type("Tok", (), {"eos_token_id": 151645, "pad_token_id": 151643, "unk_token_id": None,
                               "convert_tokens_to_ids": lambda self, t: 151645})()
        prompts = [ids(a.prompt_tokens) for _ in range(a.gen_prompts)]
        dsrl.sample_responses(model, tok, [ids(4)], 1, 2, min_new_tokens=2)  # warm-up: lazy buffers
        before = reset_peak()
        t0 = time.time()
        dsrl.sample_responses(model, tok, prompts, a.group_size, a.gen_tokens, min_new_tokens=a.gen_tokens)
        return {"measured": (rss_kb("VmHWM") - before) * 1024, "secs": time.time() - t0}
    ckpt = part == "loss+ckpt"
    prompts, responses = [ids(a.prompt_tokens)], [ids(a.response_tokens)]

    def loss_pass(ys):
        logp, mask = dsrl.logprob_y_given_x(model, prompts, ys, 151643, 1.0, a.chunk, checkpointing=ckpt)
        ((logp * mask).sum() / mask.sum()).backward()

    loss_pass([ids(8)])  # allocates the .grad buffers: they belong to the training state
    before = reset_peak()
    t0 = time.time()
    loss_pass(responses)
    return {"measured": (rss_kb("VmHWM") - before) * 1024, "secs": time.time() - t0}


def plan_numbers(a):
    import torch
    import scale
    config, args = qwen3_06b_config(), settings(a)
    fp32 = scale.memory_plan(config, args, None, "cpu", torch.float32, False)
    bf16 = scale.memory_plan(config, args, None, "cpu", torch.bfloat16, False)
    loss_args = settings(a)
    loss_args.max_new_tokens = a.response_tokens
    loss = {ck: scale.memory_plan(config, loss_args, None, "cpu", torch.float32, ck)["activations"]
            for ck in (False, True)}
    return {"state": fp32["training_state"], "copy": bf16["sampling_copy"], "kv": fp32["kv_cache"],
            "loss": loss[False], "loss+ckpt": loss[True]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="state,copy,kv,loss,loss+ckpt")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--response-tokens", type=int, default=896,
                    help="loss pass: response tokens (prompt + these = 1,024)")
    ap.add_argument("--gen-prompts", type=int, default=4, help="kv: prompts per generate call")
    ap.add_argument("--group-size", type=int, default=2, help="kv: samples per prompt")
    ap.add_argument("--gen-tokens", type=int, default=128, help="kv: new tokens per sample (forced)")
    ap.add_argument("--chunk", type=int, default=256, help="--logprob-chunk")
    ap.add_argument("--mmap-threshold", type=int, default=131072,
                    help="MALLOC_MMAP_THRESHOLD_ for the children (bytes); 0 = glibc's default (dynamic) allocator")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a)))
        return
    plan = plan_numbers(a)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k not in ("parts", "child")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if a.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(a.mmap_threshold)
    rows = []
    for part in a.parts.split(","):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", part] + flags, capture_output=True,
                             text=True, env=env)
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            rows.append((part, plan[part], None))
            continue
        rows.append((part, plan[part], json.loads(out.stdout.strip().splitlines()[-1])["measured"]))
        print(f"  {part}: plan {plan[part] / MiB:.0f} MiB, measured {rows[-1][2] / MiB:.0f} MiB", file=sys.stderr)
    print(f"\nQwen3-0.6B configuration, random weights, CPU, one thread. kv: {a.gen_prompts} prompts x {a.group_size} "
          f"samples x ({a.prompt_tokens} + {a.gen_tokens}) tokens, fp32; loss: 1 x ({a.prompt_tokens} + "
          f"{a.response_tokens}) tokens, fp32, --logprob-chunk {a.chunk}; MALLOC_MMAP_THRESHOLD_="
          f"{a.mmap_threshold or 'glibc default'}\n")
    print("| part | plan (MiB) | measured (MiB) | measured / plan |\n|---|---:|---:|---:|")
    for part, p, m in rows:
        print(f"| {part} | {p / MiB:,.0f} | " + (f"{m / MiB:,.0f} | {m / p:.2f} |" if m is not None else "failed | |"))


if __name__ == "__main__":
    main()
