"""One training step of dsrl.py versus TRL's GRPOTrainer on identical work, measured alternately.

    python bench/step_vs_trl.py                              # CPU, tiny Qwen3, 64 and 256 new tokens, TRL GC off
    python bench/step_vs_trl.py --trl-gradient-checkpointing off,on   # both TRL settings in one alternation
    python bench/step_vs_trl.py --new-tokens 64 --steps 20
    python bench/step_vs_trl.py --dsrl-kv-cache dynamic,compile   # both dsrl samplers vs TRL
    python bench/step_vs_trl.py --model-config qwen3-0.6b --device cuda   # GPU: random-init Qwen3-0.6B config
    # GPU at dsrl's default sizes, with the decode floor of an H100 SXM (3,350 GB/s); the full set of GPU
    # commands is in bench/README.md, "GPU (to run)"
    python bench/step_vs_trl.py --model-config qwen3-0.6b --device cuda --prompts 16 --new-tokens 1024 \\
        --micro-batch 8 --trl-gradient-checkpointing off,on --hbm-gbs 3350

Setup (identical on both sides)
  * model: the tiny offline Qwen3 of test_dsrl.py (2 layers, hidden 64, char-level ChatML tokenizer), or with
    --model-config qwen3-0.6b a randomly initialised model with the real Qwen3-0.6B config (vocab 151,936,
    28 layers, hidden 1024, tied embeddings) and a char-level tokenizer padded to that vocabulary;
  * prompts: the same --prompts problems (default 4) every step (offline_model.problem_rows, stored in the model
    folder as bench_rows.json), each a chat [system: dsrl.SYSTEM_PROMPT, user: problem]. dsrl renders them with its own
    dsrl.build_prompt; TRL gets the same chats as conversational prompts and renders them itself with the same
    tokenizer chat template and chat_template_kwargs={"enable_thinking": False} (Qwen3 non-thinking, as
    build_prompt). Each worker reports the prompt token ids it actually generated from in every step (TRL's are
    taken at the entry of its generate wrapper); the parent prints the counts of one step and ASSERTS that all
    workers used the same prompt ids (same counts and the same md5) and generated the same number of tokens;
  * G = 8 samples per prompt, temperature 1, top-p 1, top-k off, and FULL-LENGTH generation
    (min_new_tokens = max_new_tokens on both sides: TRL gets it via GRPOConfig(generation_kwargs=...)), so
    nobody wins by stopping early;
  * GRPO loss: beta 0 (no KL, no reference model), one update per batch (num_iterations 1, so no old-log-prob
    pass on either side), token-mean over all tokens of the step (TRL loss_type "dapo" is exactly that),
    epsilon 0.2, std-scaled group advantages, AdamW lr 1e-6, weight decay 0.01, grad-norm clip 1.0, fp32 on CPU;
  * reward (--reward): "math" (default) = dsrl.score, the trainer's own reward, on the decoded responses
    against the gold answers, on BOTH sides (TRL's reward function calls dsrl.score too). The tiny model answers
    \\boxed{1} or \\boxed{2} at random, so ~50% are right and groups are mixed. "hash" = a deterministic hash of
    (index in the group, response token ids) -> 0/1, if a model gives no mixed groups. Positive share and the
    number of uniform groups (all rewards equal: dsrl skips their forward, TRL multiplies them by 0) are reported;
  * TRL's gradient checkpointing (--trl-gradient-checkpointing): TRL 1.16 turns it ON by default
    (GRPOConfig.gradient_checkpointing=True); it trades loss-pass speed for memory, and dsrl does not
    checkpoint the transformer body. Default here: off; "off,on" runs one TRL worker per setting;
  * dsrl is ALSO run in NSR-PreRL mode (P(y), negative samples only), which TRL does not have.

How dsrl is run: `dsrl_worker` runs the trainer's step in the trainer's order with dsrl.py's own functions:
build_prompt -> sample_responses(kv_cache=...) -> batch_decode -> score -> group_advantages -> sample_mask -> policy_update
(loss, backward, non-finite skip, AdamW step) -> sync_generation_copy. Left out: checkpointing, the metric row
and the jsonl logs; sample_responses gets min_new_tokens (an existing parameter).
  --dsrl-kv-cache  dsrl's --kv-cache (dynamic | static | compile); a comma list runs one dsrl-GRPO worker per
                   value in the same alternation (e.g. dynamic,compile). "compile" compiles the decode step in
                   the first steps: --warmup is raised to >= 2 for it; warm-up steps are never timed.
  --micro-batch    sequences per loss forward/backward on BOTH sides: dsrl's --micro-batch-size and TRL's
                   per_device_train_batch_size (with gradient_accumulation_steps = prompts x G / micro-batch, so
                   one TRL optimizer step still generates for all prompts once). Default: prompts x G (32),
                   one forward for the whole batch on both sides.
  --prompts        prompts per step (default 4); G = 8 samples each.
  --chunk          dsrl's --logprob-chunk; default: dsrl's own default (dsrl.Args().logprob_chunk, 256).
  --dsrl-deterministic  dsrl's --deterministic in the dsrl workers (run with and without it to see its cost).
How TRL is run: GRPOTrainer.train() as is; a TrainerCallback blocks in on_step_begin until the parent says
"go" and takes the time at on_step_end (after clip, AdamW step and zero_grad, before logging).

Alternation and memory: each system lives in its OWN worker process (dsrl-grpo and dsrl-nsr in the main
venv, TRL in the side venv /tmp/venv-bench or $TRL_PYTHON), so peak RSS never mixes. The parent sends "go"
round-robin: dsrl-grpo step, trl step (one per gradient-checkpointing setting), dsrl-nsr step, dsrl-grpo
step, ...; only one worker computes at any time, so a slow phase of the machine hits all systems alike. Each
worker: torch.set_num_threads(1). --warmup untimed steps (default 1), then --steps timed steps (default 10);
reported: median, min-max and interquartile range of the timed steps. Peak memory: ru_maxrss of each worker
(CPU), or torch.cuda.max_memory_allocated (GPU). "gen ms/tok" = generation time / new tokens: the time of one
decode step of the whole batch (prefill included). With --hbm-gbs B (the device's memory bandwidth, GB/s) the
summary adds the memory-bandwidth floor of one decode step of dsrl's sampler: (bytes of its weights + the
batch's KV cache at the mean length) / B.

The LAST line printed is `ratio=... dsrl_s=... trl_s=... dsrl_peak_mb=... trl_peak_mb=... trl_gc=...` for the
last --new-tokens value (dsrl = GRPO mode with the last --dsrl-kv-cache value; TRL = the first
--trl-gradient-checkpointing value; ratio = dsrl_s / trl_s, medians).
"""
import argparse
import collections
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SIDE_VENV_PY = os.environ.get("TRL_PYTHON", "/tmp/venv-bench/bin/python")  # the side venv with trl (see README)
GROUP = 8  # samples per prompt
MAX_PROMPTS = 64  # problems stored in the model folder; --prompts takes the first ones
PROTO = "@@"  # prefix of protocol lines on a worker's stdout (libraries may print other lines)
ROWS_FILE = "bench_rows.json"  # the problems, in the model folder


def hash_reward(ids, g) -> float:
    """--reward hash: 0/1 from a hash of (g = the sample's index in its group, the response token ids):
    deterministic, content-dependent, ~50% positive. The index is salted in because a model's first tokens may
    be nearly deterministic (a hash of the ids alone gave 0 for every sample of the tiny model at 8 new tokens).
    Both sides order the batch prompt-major (sample i is number i % G of its group)."""
    return float(hashlib.md5((f"{g}:" + ",".join(map(str, ids))).encode()).digest()[0] < 128)


def rewards_for(kind, texts, golds, response_ids):
    """The step's rewards, the same function on both sides (dsrl.score is the trainer's own reward)."""
    import dsrl
    if kind == "hash":
        return [hash_reward(y, i % GROUP) for i, y in enumerate(response_ids)]
    return dsrl.score(texts, golds)[0]


def reward_stats(rewards):
    groups = [rewards[i:i + GROUP] for i in range(0, len(rewards), GROUP)]
    return {"pos_share": sum(rewards) / len(rewards), "uniform_groups": sum(len(set(g)) == 1 for g in groups)}


def prompt_signature(prompt_ids_per_sample):
    """What the parent compares across workers: the prompt token count of every sample (sorted: TRL shuffles the
    prompt order) and an md5 of the sorted token id lists."""
    rows = sorted(tuple(p) for p in prompt_ids_per_sample)
    return {"prompt_lens": [len(p) for p in rows], "prompt_md5": hashlib.md5(repr(rows).encode()).hexdigest()[:12]}


def peak_mb(device):
    import torch
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def sync(device):
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def send(obj):
    print(PROTO + json.dumps(obj), flush=True)


# ----------------------------------------------------------------------------------------------------
# Model building: the pretrained tiny model comes from test_dsrl.py (pytest); the rest needs no test code
# ----------------------------------------------------------------------------------------------------
def build_model(out_dir, model_config):
    sys.path[:0] = [REPO, HERE]
    if model_config == "tiny":
        from test_dsrl import make_tiny_model
        make_tiny_model(out_dir)
    else:  # qwen3-0.6b: the real architecture, random init; tokenizer padded to the full vocabulary
        import offline_model
        offline_model.build(out_dir, "qwen3-0.6b")
    write_rows(out_dir)


def write_rows(out_dir):
    """The benchmark's problems in the official verl row format (system prompt = dsrl.SYSTEM_PROMPT)."""
    sys.path[:0] = [REPO, HERE]
    import dsrl
    import offline_model
    offline_model.write_rows(os.path.join(out_dir, ROWS_FILE), MAX_PROMPTS, dsrl.SYSTEM_PROMPT)


def n_rows(model_dir):
    path = os.path.join(model_dir, ROWS_FILE)
    if not os.path.exists(path):
        return 0
    with open(path) as fh:
        return len(json.load(fh))


def load_examples(model_dir, n):
    """The first n problems as [{"messages", "answer"}] via dsrl.row_to_example, the trainer's own row reader
    (both sides)."""
    import dsrl
    with open(os.path.join(model_dir, ROWS_FILE)) as fh:
        examples = [dsrl.row_to_example(r) for r in json.load(fh)[:n]]
    assert all(examples) and all(ex["messages"][0]["content"] == dsrl.SYSTEM_PROMPT for ex in examples)
    return examples


# ----------------------------------------------------------------------------------------------------
# dsrl worker: the trainer's step, in the trainer's order, with dsrl.py's functions
# ----------------------------------------------------------------------------------------------------
def dsrl_worker(a):
    import torch
    sys.path.insert(0, REPO)
    import dsrl
    torch.set_num_threads(1)
    device = dsrl.resolve_device(a.device)
    args = dsrl.Args(model=a.model_dir, mode=a.mode, prompts_per_step=a.prompts, group_size=GROUP,
                     max_new_tokens=a.new_tokens, temperature=1.0, top_p=1.0, lr=1e-6, weight_decay=0.01,
                     clip_low=0.2, clip_high=0.2, grad_clip=1.0, micro_batch_size=a.micro_batch,
                     logprob_chunk=a.chunk or dsrl.Args().logprob_chunk, kv_cache=a.kv_cache, device=device,
                     dtype=a.dtype, seed=0, deterministic=a.dsrl_deterministic)
    dsrl.check_args(args)
    if args.deterministic:  # as dsrl.start_run does for --deterministic, before CUDA starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    dtype = dsrl.resolve_dtype(args.dtype, device)
    model, tokenizer = dsrl.load_model_and_tokenizer(a.model_dir, device)
    start_id, pad = dsrl.token_id(tokenizer, dsrl.START_TOKEN), dsrl.pad_id(tokenizer)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
    gen_model = dsrl.generation_copy(model, dtype)
    examples = load_examples(a.model_dir, a.prompts)
    # mode "grpo": P(y|x), all samples; "nsr-prerl": P(y), negatives only (the phase a dsrl run warms up with)
    phase = dsrl.phase_for_step(args.mode, 1, args.warmup_steps, args.prerl_coef)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    item = torch.empty((), dtype=dtype).element_size()  # the sampler's dtype
    send({"ready": True, "rss_mb": peak_mb("cpu"), "phase": phase._asdict(), "dtype": str(dtype),
          "deterministic": torch.are_deterministic_algorithms_enabled(),
          "kv_cache": args.kv_cache, "micro_batch": args.micro_batch_size, "logprob_chunk": args.logprob_chunk,
          "gen_weight_bytes": sum(p.numel() for p in gen_model.parameters()) * item,
          "kv_bytes_per_token": 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * item,
          "prompt_len_max": max(len(dsrl.build_prompt(tokenizer, ex["messages"], args.max_prompt_tokens))
                                for ex in examples), "batch": len(examples) * args.group_size})
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    base = peak_mb(device)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        sync(device)
        t0 = time.perf_counter()
        # --- the trainer's step (dsrl.train: rollout, advantages, mask, policy_update, re-sync) -------------
        prompt_ids = [dsrl.build_prompt(tokenizer, ex["messages"], args.max_prompt_tokens) for ex in examples]
        t_g = time.perf_counter()
        responses, truncated = dsrl.sample_responses(gen_model, tokenizer, prompt_ids, args.group_size,
                                                     args.max_new_tokens, args.temperature, args.top_p,
                                                     args.gen_batch_size, min_new_tokens=args.max_new_tokens,
                                                     dtype=dtype, kv_cache=args.kv_cache)
        sync(device)
        t_gen = time.perf_counter() - t_g  # generation alone, as TRL's timer around its generate call
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        golds = [ex["answer"] for ex in examples for _ in range(args.group_size)]  # prompt-major, as dsrl.rollout
        rewards = rewards_for(a.reward, texts, golds, responses)  # dsrl.score(texts, golds) by default
        adv = dsrl.group_advantages(rewards, args.group_size, phase.use_std)
        keep = dsrl.sample_mask(adv, phase.samples)
        prompt_per_sample = [p for p in prompt_ids for _ in range(args.group_size)]
        batch = dsrl.Batch(prompt_per_sample, responses, adv, keep)
        stats = dsrl.policy_update(model, optimizer, batch, phase, args, start_id, pad)
        if not stats.skipped:
            dsrl.sync_generation_copy(gen_model, model)
        sync(device)
        t_step = time.perf_counter() - t0
        # ---------------------------------------------------------------------------------------------
        send({"step_s": t_step, "gen_s": t_gen, **reward_stats(rewards), "n_used": stats.n_used,
              "gen_tokens": sum(len(y) for y in responses), "loss": stats.loss, "skipped": int(stats.skipped),
              **prompt_signature(prompt_per_sample)})
    send({"done": True, "peak_mb": peak_mb(device), "base_mb": base})


# ----------------------------------------------------------------------------------------------------
# TRL worker: GRPOTrainer.train(), paced by a callback
# ----------------------------------------------------------------------------------------------------
def trl_worker(a):
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, REPO)
    import datasets
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    cuda = a.device.startswith("cuda") or (a.device == "auto" and torch.cuda.is_available())
    device = "cuda" if cuda else "cpu"
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    examples = load_examples(a.model_dir, a.prompts)
    # conversational prompts: TRL applies the tokenizer's chat template itself (chat_template_kwargs below)
    ds = datasets.Dataset.from_list([{"prompt": ex["messages"], "answer": ex["answer"]} for ex in examples])
    T = a.new_tokens
    last = {}

    def reward_fn(prompts, completions, completion_ids, answer, **kw):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        r = rewards_for(a.reward, texts, answer, completion_ids)  # dsrl.score(texts, golds) by default
        last.update(reward_stats(r), gen_tokens=sum(len(ids) for ids in completion_ids))
        return r

    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_bench_"), report_to="none", save_strategy="no",
        logging_steps=10**6, log_completions=False, seed=0, use_cpu=not cuda, bf16=cuda,
        gradient_checkpointing=a.trl_gc == "on",  # TRL's default is True; see --trl-gradient-checkpointing
        max_steps=a.warmup + a.steps, per_device_train_batch_size=a.micro_batch,
        gradient_accumulation_steps=a.prompts * GROUP // a.micro_batch,  # one optimizer step = all prompts
        num_generations=GROUP, max_completion_length=T, temperature=1.0, top_p=1.0, top_k=0,
        generation_kwargs={"min_new_tokens": T},  # full-length generation, as on the dsrl side
        chat_template_kwargs={"enable_thinking": False},  # Qwen3 non-thinking, as dsrl.build_prompt
        beta=0.0, num_iterations=1, loss_type="dapo", epsilon=0.2, scale_rewards="group",
        mask_truncated_completions=False, learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.01, max_grad_norm=1.0, dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=reward_fn, args=cfg, train_dataset=ds, processing_class=tok)

    # time the generation part: TRL's single-turn generate wrapper (model.generate + EOS mask); its first
    # argument is the prompt token ids TRL rendered, one list per sample: those are compared with dsrl's
    gen_time = {"s": 0.0}
    orig_gen = trainer._generate_single_turn

    def timed_gen(prompt_ids, *args_, **kw):
        last.update(prompt_signature(prompt_ids))
        sync(device)
        t = time.perf_counter()
        out = orig_gen(prompt_ids, *args_, **kw)
        sync(device)
        gen_time["s"] += time.perf_counter() - t
        return out
    trainer._generate_single_turn = timed_gen

    class Pace(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            line = sys.stdin.readline()
            if line.strip() != "go":
                raise SystemExit(0)
            gen_time["s"] = 0.0
            self.gc = bool(getattr(model, "is_gradient_checkpointing", False))
            sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync(device)
            dt = time.perf_counter() - self.t0
            send({"step_s": dt, "gen_s": gen_time["s"], "gc": self.gc, **last})

    trainer.add_callback(Pace())
    send({"ready": True, "rss_mb": peak_mb("cpu"), "trl": trl.__version__, "optim": str(cfg.optim),
          "gradient_checkpointing": cfg.gradient_checkpointing, "bf16": cfg.bf16})
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = peak_mb(device)
    trainer.train()
    sys.stdin.readline()  # the parent's "quit"
    send({"done": True, "peak_mb": peak_mb(device), "base_mb": base})


# ----------------------------------------------------------------------------------------------------
# Parent: start workers, alternate, summarise
# ----------------------------------------------------------------------------------------------------
class Worker:
    def __init__(self, name, python, extra, log_dir):
        self.name = name
        self.log = open(os.path.join(log_dir, f"{name}.log"), "w")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.p = subprocess.Popen([python, os.path.abspath(__file__)] + extra, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, cwd=REPO)

    def recv(self):
        for line in self.p.stdout:
            if line.startswith(PROTO):
                return json.loads(line[len(PROTO):])
            self.log.write(line)
        raise RuntimeError(f"worker {self.name} died (rc={self.p.wait()}); see {self.log.name}")

    def send(self, msg):
        self.p.stdin.write(msg + "\n")
        self.p.stdin.flush()


def spread(xs):
    """median, min, max, first and third quartile."""
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (xs[0],) * 3
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "q1": q1, "q3": q3}


def counts(lens):
    return " + ".join(f"{n} x {length}" for length, n in sorted(collections.Counter(lens).items()))


def check_same_work(a, T, res):
    """Every timed step: all workers generated from the same prompt ids, and (forced full length) the same
    number of tokens. Prints one step's prompt token counts of every worker."""
    names = list(res)
    first = a.warmup
    print(f"  T={T} prompt tokens per sample, step {first + 1} (first timed step):", file=sys.stderr)
    for name in names:
        r = res[name][first]
        print(f"    {name:17s} {counts(r['prompt_lens'])} = {sum(r['prompt_lens'])} tokens, ids md5 {r['prompt_md5']}, "
              f"generated {r['gen_tokens']} tokens", file=sys.stderr)
    for i in range(a.warmup + a.steps):
        ref = res[names[0]][i]
        for name in names[1:]:
            r = res[name][i]
            assert r["prompt_lens"] == ref["prompt_lens"], f"step {i + 1}: prompt token counts differ ({names[0]} vs {name})"
            assert r["prompt_md5"] == ref["prompt_md5"], f"step {i + 1}: prompt token ids differ ({names[0]} vs {name})"
            assert r["gen_tokens"] == ref["gen_tokens"] == len(ref["prompt_lens"]) * T, \
                f"step {i + 1}: generated tokens differ ({names[0]} {ref['gen_tokens']}, {name} {r['gen_tokens']})"


def run_length(a, T, log_dir):
    common = ["--model-dir", a.model_dir, "--new-tokens", str(T), "--device", a.device, "--dtype", a.dtype,
              "--warmup", str(a.warmup), "--steps", str(a.steps), "--micro-batch", str(a.micro_batch), "--prompts", str(a.prompts),
              "--chunk", str(a.chunk), "--reward", a.reward] + (["--dsrl-deterministic"] if a.dsrl_deterministic else [])
    specs = [(grpo_name(a, kv), a.dsrl_python, ["--worker", "dsrl", "--mode", "grpo", "--kv-cache", kv])
             for kv in a.kv_list]
    specs += [(trl_name(gc), a.trl_python, ["--worker", "trl", "--trl-gc", gc]) for gc in a.gc_list]
    if not a.no_nsr:
        specs.append(("dsrl-nsr", a.dsrl_python, ["--worker", "dsrl", "--mode", "nsr-prerl", "--kv-cache", a.kv_list[-1]]))
    workers, ready = [], {}
    for name, py, extra in specs:  # start one at a time so set-up does not overlap the other's
        w = Worker(f"{name}-T{T}", py, extra + common, log_dir)
        ready[name] = w.recv()
        workers.append((name, w))
        print(f"  [{name}] ready: {ready[name]}", file=sys.stderr)
    res = {name: [] for name, _, _ in specs}
    for i in range(a.warmup + a.steps):  # round-robin, one step each
        for name, w in workers:
            w.send("go")
            r = w.recv()
            res[name].append(r)
            print(f"  T={T} step {i + 1:2d}{' (warm-up)' if i < a.warmup else '          '} {name:17s} "
                  f"{r['step_s']:7.3f}s  gen {r['gen_s']:7.3f}s  pos {r['pos_share']:.2f}  "
                  f"uniform groups {r['uniform_groups']}", file=sys.stderr)
    check_same_work(a, T, res)
    for gc in a.gc_list:
        got = {r["gc"] for r in res[trl_name(gc)]}
        assert got == {gc == "on"}, f"TRL worker {trl_name(gc)}: model.is_gradient_checkpointing was {got}"
    out = {}
    for name, w in workers:
        w.send("quit")
        final = w.recv()
        w.p.wait()
        steps = res[name][a.warmup:]
        out[name] = {"step_s": spread([s["step_s"] for s in steps]),
                     "gen_s": statistics.median(s["gen_s"] for s in steps),
                     "rest_s": statistics.median(s["step_s"] - s["gen_s"] for s in steps),
                     "pos_share": statistics.mean(s["pos_share"] for s in steps),
                     "uniform_groups": sum(s["uniform_groups"] for s in steps),
                     "peak_mb": final["peak_mb"], "step_extra_mb": final["peak_mb"] - final["base_mb"],
                     "gen_tokens": steps[-1]["gen_tokens"], "prompt_lens": steps[0]["prompt_lens"],
                     "all_steps": [round(s["step_s"], 4) for s in steps],
                     "warmup_steps": [round(s["step_s"], 4) for s in res[name][:a.warmup]], "ready": ready[name]}
    return out


def grpo_name(a, kv):
    return "dsrl-grpo" if len(a.kv_list) == 1 else f"dsrl-grpo-{kv}"


def trl_name(gc):
    return f"trl-grpo-gc-{gc}"


def main():
    ap = argparse.ArgumentParser(description="dsrl.py vs TRL GRPOTrainer: one training step")
    ap.add_argument("--new-tokens", default="64,256", help="comma list; each is a separate alternating run")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per system (median, min-max, IQR)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per system first")
    ap.add_argument("--model-config", choices=["tiny", "qwen3-0.6b"], default="tiny")
    ap.add_argument("--model-dir", default="", help="use an existing model folder (built by this script)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="auto", help="dsrl --dtype (auto: fp32 on CPU, bf16 on GPU)")
    ap.add_argument("--dsrl-kv-cache", default="dynamic",
                    help="dsrl --kv-cache: dynamic, static or compile; a comma list runs one dsrl-GRPO worker each")
    ap.add_argument("--trl-gradient-checkpointing", default="off", metavar="{off,on}",
                    help="TRL's gradient_checkpointing (TRL's own default: on). off (default), on, or off,on: one "
                         "TRL worker per setting in the same alternation")
    ap.add_argument("--reward", choices=["math", "hash"], default="math",
                    help="math: dsrl.score on both sides (default); hash: a 0/1 hash of the response ids")
    ap.add_argument("--prompts", type=int, default=4, help=f"prompts per step (<= {MAX_PROMPTS}), {GROUP} samples each")
    ap.add_argument("--micro-batch", "--dsrl-micro-batch", dest="micro_batch", type=int, default=0,
                    help="sequences per loss forward on both sides: dsrl --micro-batch-size and TRL "
                         "per_device_train_batch_size (gradient accumulation up to prompts x G); must divide "
                         "prompts x G; 0 (default): prompts x G, the whole batch in one forward")
    ap.add_argument("--hbm-gbs", type=float, default=0.0,
                    help="device memory bandwidth in GB/s: print the memory-bandwidth floor of one decode step")
    ap.add_argument("--chunk", type=int, default=0, help="dsrl --logprob-chunk (0: dsrl's default, 256)")
    ap.add_argument("--no-nsr", action="store_true", help="skip the dsrl NSR-PreRL worker")
    ap.add_argument("--dsrl-deterministic", action="store_true",
                    help="dsrl --deterministic (torch's deterministic algorithms) in the dsrl workers, to measure its cost")
    ap.add_argument("--dsrl-python", default=sys.executable, help="python of the main venv (dsrl, no trl needed)")
    ap.add_argument("--trl-python", default=SIDE_VENV_PY if os.path.exists(SIDE_VENV_PY) else sys.executable)
    ap.add_argument("--build-only", action="store_true", help="build the model folder and exit")
    ap.add_argument("--json", default="", help="also write all results here")
    # worker-only flags
    ap.add_argument("--worker", choices=["dsrl", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="grpo", help=argparse.SUPPRESS)
    ap.add_argument("--kv-cache", default="dynamic", help=argparse.SUPPRESS)
    ap.add_argument("--trl-gc", default="off", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.kv_list = [k for k in a.dsrl_kv_cache.split(",") if k]
    bad = [k for k in a.kv_list if k not in ("dynamic", "static", "compile")]
    if bad or not a.kv_list:
        ap.error(f"--dsrl-kv-cache: expected dynamic, static or compile, got {a.dsrl_kv_cache!r}")
    a.gc_list = [g for g in a.trl_gradient_checkpointing.split(",") if g]
    if not a.gc_list or any(g not in ("off", "on") for g in a.gc_list) or len(set(a.gc_list)) < len(a.gc_list):
        ap.error(f"--trl-gradient-checkpointing: expected off, on or off,on, got {a.trl_gradient_checkpointing!r}")
    if not 1 <= a.prompts <= MAX_PROMPTS:
        ap.error(f"--prompts: 1..{MAX_PROMPTS}")
    a.micro_batch = a.micro_batch or a.prompts * GROUP
    if a.micro_batch < 1 or (a.prompts * GROUP) % a.micro_batch:
        ap.error(f"--micro-batch {a.micro_batch} must divide prompts x G = {a.prompts * GROUP}")
    if a.steps < 1 or a.warmup < 1:
        ap.error("--steps and --warmup must be >= 1 (the first step is never timed)")
    if any(k != "dynamic" for k in a.kv_list + [a.kv_cache]) and a.warmup < 2:
        print(f"--warmup {a.warmup} raised to 2: compilation (static/compile KV cache) happens in the first steps",
              file=sys.stderr)
        a.warmup = 2
    if a.worker:
        a.new_tokens = int(a.new_tokens)
        return dsrl_worker(a) if a.worker == "dsrl" else trl_worker(a)

    t_start, load_start = time.time(), os.getloadavg()
    if not a.model_dir or not os.path.exists(os.path.join(a.model_dir, "config.json")):
        a.model_dir = a.model_dir or tempfile.mkdtemp(prefix=f"bench_{a.model_config}_")
        os.makedirs(a.model_dir, exist_ok=True)
        t = time.time()
        subprocess.run([a.dsrl_python, "-c", f"import sys; sys.path.insert(0, {HERE!r}); import step_vs_trl as s; "
                        f"s.build_model({a.model_dir!r}, {a.model_config!r})"], check=True, cwd=REPO)
        print(f"model ({a.model_config}) built in {a.model_dir} in {time.time() - t:.0f}s", file=sys.stderr)
    elif n_rows(a.model_dir) < a.prompts:  # a folder built by an older version
        subprocess.run([a.dsrl_python, "-c", f"import sys; sys.path.insert(0, {HERE!r}); import step_vs_trl as s; "
                        f"s.write_rows({a.model_dir!r})"], check=True, cwd=REPO)
    if a.build_only:
        return
    if load_start[0] > 1.0:
        print(f"warning: load average {load_start[0]:.1f} before the start: other processes compete for the CPU; "
              "the alternation keeps ratios comparable, absolute times are not", file=sys.stderr)
    log_dir = tempfile.mkdtemp(prefix="bench_logs_")
    print(f"worker logs: {log_dir}", file=sys.stderr)
    all_res = {}
    for T in [int(t) for t in a.new_tokens.split(",")]:
        all_res[T] = run_length(a, T, log_dir)
    load_end = os.getloadavg()
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"load_avg_start": load_start, "load_avg_end": load_end, "args": vars(a),
                       **{str(k): v for k, v in all_res.items()}}, fh, indent=1)

    mem = "peak GPU MB" if a.device.startswith("cuda") else "peak RSS MB"
    trl_names = [trl_name(gc) for gc in a.gc_list]
    print(f"\n{a.model_config} model, {a.prompts} prompts x {GROUP}, device {a.device}, 1 thread, reward {a.reward}, "
          f"{a.steps} timed steps after {a.warmup} warm-up, alternating workers, micro-batch "
          f"{a.micro_batch} (both sides), logprob chunk {a.chunk or 'dsrl default'}, NSR kv-cache {a.kv_list[-1]}, "
          f"dsrl deterministic {'on' if a.dsrl_deterministic else 'off'}, "
          f"wall {time.time() - t_start:.0f}s, load average (1/5/15 min) at start "
          f"{'/'.join(f'{x:.1f}' for x in load_start)}, at end {'/'.join(f'{x:.1f}' for x in load_end)}")
    ratio_cols = "".join(f" {'x ' + n.replace('trl-grpo-', 'TRL '):>11}" for n in trl_names)
    print("(median s, min-max, IQR: step time over the timed steps; gen ms/tok: generation s / new tokens; pos%: "
          "positive rewards; unif: groups with all rewards equal, summed over the timed steps)")
    print(f"{'T':>4} {'system':17} {'median s':>8} {'min-max s':>13} {'IQR s':>13} {'gen s':>7} {'gen ms/tok':>10} "
          f"{'loss+upd s':>10}{ratio_cols} {'pos%':>5} {'unif':>4} {mem:>11} {'gen tok':>7}")
    for T, res in all_res.items():
        for name, r in res.items():
            st = r["step_s"]
            ratios = "".join(f" {st['median'] / res[n]['step_s']['median']:11.2f}" for n in trl_names)
            print(f"{T:4d} {name:17} {st['median']:8.3f} {st['min']:6.3f}-{st['max']:6.3f} {st['q1']:6.3f}-{st['q3']:6.3f} "
                  f"{r['gen_s']:7.3f} {1000 * r['gen_s'] / T:10.2f} {r['rest_s']:10.3f}{ratios} {100 * r['pos_share']:5.1f} {r['uniform_groups']:4d} "
                  f"{r['peak_mb']:11.0f} {r['gen_tokens']:7d}")
    if a.hbm_gbs:
        for T, res in all_res.items():
            for kv in a.kv_list:
                info = res[grpo_name(a, kv)]["ready"]
                kv_bytes = info["batch"] * (info["prompt_len_max"] + (T + 1) / 2) * info["kv_bytes_per_token"]
                floor_ms = 1000 * (info["gen_weight_bytes"] + kv_bytes) / (a.hbm_gbs * 1e9)
                got = 1000 * res[grpo_name(a, kv)]["gen_s"] / T
                print(f"decode floor T={T} {grpo_name(a, kv)}: weights {info['gen_weight_bytes'] / 1e9:.3f} GB + KV cache "
                      f"{kv_bytes / 1e9:.3f} GB (mean over the decode) per step / {a.hbm_gbs:.0f} GB/s = {floor_ms:.3f} ms; "
                      f"measured {got:.3f} ms/tok = {got / floor_ms:.1f}x the floor")
    T, res = list(all_res.items())[-1]
    d, t = res[grpo_name(a, a.kv_list[-1])], res[trl_names[0]]
    print(f"ratio={d['step_s']['median'] / t['step_s']['median']:.3f} dsrl_s={d['step_s']['median']:.3f} "
          f"trl_s={t['step_s']['median']:.3f} dsrl_peak_mb={d['peak_mb']:.0f} trl_peak_mb={t['peak_mb']:.0f} "
          f"trl_gc={a.gc_list[0]}")


if __name__ == "__main__":
    main()
