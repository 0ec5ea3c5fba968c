"""One training step of dsrl.py versus TRL's GRPOTrainer on identical work, measured alternately.

    python bench/step_vs_trl.py                         # CPU, tiny Qwen3, 64 and 256 new tokens
    python bench/step_vs_trl.py --new-tokens 64 --steps 5
    python bench/step_vs_trl.py --dsrl-kv-cache dynamic,compile   # both dsrl samplers vs TRL
    python bench/step_vs_trl.py --model-config qwen3-0.6b --device cuda   # GPU: random-init Qwen3-0.6B config

Setup (identical on both sides)
  * model: the tiny offline Qwen3 of test_dsrl.py (2 layers, hidden 64, char-level ChatML tokenizer), or with
    --model-config qwen3-0.6b a randomly initialised model with the real Qwen3-0.6B config (vocab 151,936,
    28 layers, hidden 1024, tied embeddings) and a char-level tokenizer padded to that vocabulary;
  * the same 4 prompts (chat template, non-thinking) every step, G = 8 samples each, temperature 1, top-p 1,
    top-k off, and FULL-LENGTH generation (min_new_tokens = max_new_tokens on both sides: TRL gets it via
    GRPOConfig(generation_kwargs={"min_new_tokens": T})), so nobody wins by stopping early;
  * GRPO loss: beta 0 (no KL, no reference model), one update per batch (num_iterations 1, so no old-log-prob
    pass on either side), token-mean over all tokens of the step (TRL loss_type "dapo" is exactly that),
    epsilon 0.2, std-scaled group advantages, AdamW lr 1e-6, weight decay 0.01, grad-norm clip 1.0;
  * reward: a deterministic hash of (index in the group, response token ids) -> 0/1 (~50% positive), the same
    function on both sides (`hash_reward`), so groups are mixed and neither side can skip the backward because all
    advantages are 0. The positive share is reported.
  * dsrl is ALSO run in NSR-PreRL mode (P(y), negative samples only), which TRL does not have.

How dsrl is run: `dsrl_worker` runs the body of dsrl.train's step loop (sample_responses(kv_cache=...) ->
decode -> reward -> group_advantages -> sample_mask -> policy_update, which is the trainer's own loss, backward,
optimizer step and sampler re-sync), calling the same dsrl.py functions; only checkpointing, the metric row and the jsonl logs are left out, the reward is
`hash_reward` instead of dsrl.score, and sample_responses gets min_new_tokens (an existing parameter).
  --dsrl-kv-cache  dsrl's --kv-cache (dynamic | static | compile); a comma list runs one dsrl-GRPO worker per
                   value in the same alternation (e.g. dynamic,compile). "compile" compiles the decode step in
                   the first steps: --warmup is raised to >= 2 for it, warm-up steps are not in the medians.
  --dsrl-micro-batch  dsrl's --micro-batch-size. Default 32 = N_PROMPTS x GROUP = TRL's
                   per_device_train_batch_size, i.e. TRL's loss forward runs all 32 sequences at once, and so
                   does dsrl's by default: identical sequences per forward.
  --chunk          dsrl's --logprob-chunk; default: dsrl's own default (dsrl.Args().logprob_chunk, 256).
How TRL is run: GRPOTrainer.train() as is; a TrainerCallback blocks in on_step_begin until the parent says
"go" and takes the time at on_step_end (after clip, AdamW step and zero_grad, before logging).

Alternation and memory: each system lives in its OWN worker process (dsrl-grpo and dsrl-nsr in the main
venv, TRL in the side venv /tmp/venv-bench or $TRL_PYTHON), so peak RSS never mixes. The parent sends "go" round-robin:
dsrl-grpo step, trl step, dsrl-nsr step, dsrl-grpo step, ...; only one worker computes at any time, so a
slow phase of the machine hits all systems alike. Each worker: torch.set_num_threads(1). Medians over
--steps measured steps after --warmup steps. Peak memory: ru_maxrss of each worker (CPU), or
torch.cuda.max_memory_allocated (GPU).

The LAST line printed is `ratio=... dsrl_s=... trl_s=... dsrl_peak_mb=... trl_peak_mb=...` for the last
--new-tokens value (dsrl = GRPO mode; ratio = dsrl_s / trl_s).
"""
import argparse
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
N_PROMPTS, GROUP = 4, 8
PROTO = "@@"  # prefix of protocol lines on a worker's stdout (libraries may print other lines)


def hash_reward(ids, g) -> float:
    """0/1 from a hash of (g = the sample's index in its group, the response token ids): deterministic,
    content-dependent, ~50% positive. The index is salted in because the tiny test model's first ~8 tokens are
    nearly deterministic: a hash of the ids alone gave 0 for every sample at 8 new tokens (all advantages 0,
    dsrl then legitimately skips the backward and TRL does not, an unfair comparison). Both sides order the
    batch prompt-major (sample i is number i % G of its group), so both compute the same function."""
    return float(hashlib.md5((f"{g}:" + ",".join(map(str, ids))).encode()).digest()[0] < 128)


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
# Model building (runs in the main venv: test_dsrl.py imports pytest)
# ----------------------------------------------------------------------------------------------------
def build_model(out_dir, model_config):
    sys.path.insert(0, REPO)
    from test_dsrl import make_tiny_model, problem_rows
    if model_config == "tiny":
        make_tiny_model(out_dir)
    else:  # qwen3-0.6b: the real architecture, random init; tokenizer padded to the full vocabulary
        import torch
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM
        from test_dsrl import CHAT_TEMPLATE, SPECIALS
        V = 151_936
        chars = ["<unk>"] + [chr(c) for c in range(32, 127)] + ["\n"]
        toks = list(SPECIALS) + chars
        toks += [f"<t{i}>" for i in range(V - len(toks))]  # decodable filler ids (a random model samples them)
        core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(toks)}, unk_token="<unk>"))
        core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        core.decoder = decoders.Fuse()
        tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", additional_special_tokens=list(SPECIALS),
                                      eos_token=SPECIALS[-1], pad_token=SPECIALS[0])
        tok.chat_template = CHAT_TEMPLATE
        cfg = Qwen3Config(vocab_size=V, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                          num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                          rope_theta=1_000_000, rms_norm_eps=1e-6, tie_word_embeddings=True,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(cfg)
        n = sum(p.numel() for p in model.parameters())
        print(f"built random Qwen3-0.6B config: {n / 1e6:.0f}M parameters", file=sys.stderr)
        model.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "bench_prompts.json"), "w") as fh:
        json.dump([r["prompt"] for r in problem_rows(N_PROMPTS, seed=0)], fh)


def prompt_texts(model_dir, tok):
    with open(os.path.join(model_dir, "bench_prompts.json")) as fh:
        chats = json.load(fh)
    # exactly what dsrl.build_prompt feeds the tokenizer (Qwen3 non-thinking)
    return [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True, enable_thinking=False) for m in chats]


# ----------------------------------------------------------------------------------------------------
# dsrl worker: the body of dsrl.train's step, calling dsrl.py's functions
# ----------------------------------------------------------------------------------------------------
def dsrl_worker(a):
    import torch
    sys.path.insert(0, REPO)
    import dsrl
    torch.set_num_threads(1)
    device = dsrl.resolve_device(a.device)
    args = dsrl.Args(model=a.model_dir, mode=a.mode, prompts_per_step=N_PROMPTS, group_size=GROUP,
                     max_new_tokens=a.new_tokens, temperature=1.0, top_p=1.0, lr=1e-6, weight_decay=0.01,
                     clip_low=0.2, clip_high=0.2, grad_clip=1.0, micro_batch_size=a.dsrl_micro_batch,
                     logprob_chunk=a.chunk or dsrl.Args().logprob_chunk, kv_cache=a.kv_cache, device=device,
                     dtype=a.dtype, seed=0)
    dtype = dsrl.resolve_dtype(args.dtype, device)
    model, tokenizer = dsrl.load_model_and_tokenizer(a.model_dir, device)
    start_id, pad = dsrl.token_id(tokenizer, dsrl.START_TOKEN), dsrl.pad_id(tokenizer)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
    gen_model = dsrl.generation_copy(model, dtype)
    prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"][-args.max_prompt_tokens:]
                  for t in prompt_texts(a.model_dir, tokenizer)]
    # mode "dsrl" with warmup_steps=0 is GRPO; NSR-PreRL is (space y, negatives only)
    space, samples = dsrl.phase_for_step(args.mode, 1, args.warmup_steps)
    send({"ready": True, "rss_mb": peak_mb("cpu"), "prompt_lens": [len(p) for p in prompt_ids],
          "space": space, "samples": samples, "dtype": str(dtype), "kv_cache": args.kv_cache,
          "micro_batch": args.micro_batch_size, "logprob_chunk": args.logprob_chunk})
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    base = peak_mb(device)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        sync(device)
        t0 = time.perf_counter()
        # --- dsrl.train step body -------------------------------------------------------------------
        responses, truncated = dsrl.sample_responses(gen_model, tokenizer, prompt_ids, args.group_size,
                                                     args.max_new_tokens, args.temperature, args.top_p,
                                                     args.gen_batch_size, min_new_tokens=args.max_new_tokens,
                                                     dtype=dtype, kv_cache=args.kv_cache)
        sync(device)
        t_gen = time.perf_counter() - t0
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)  # train() decodes for the reward/logs
        rewards = [hash_reward(y, i % GROUP) for i, y in enumerate(responses)]  # stands in for dsrl.score(texts, golds)
        adv = dsrl.group_advantages(rewards, args.group_size, use_std=(space == "y|x"))
        keep = dsrl.sample_mask(adv, samples)
        loss, n_used, _, _, _, skipped = dsrl.policy_update(model, gen_model, optimizer, space, prompt_ids,
                                                            responses, adv, keep, args, start_id, pad)
        sync(device)
        t_step = time.perf_counter() - t0
        # ---------------------------------------------------------------------------------------------
        send({"step_s": t_step, "gen_s": t_gen, "pos_share": sum(rewards) / len(rewards), "n_used": n_used,
              "gen_tokens": sum(len(y) for y in responses), "loss": loss, "texts": len(texts),
              "skipped": int(skipped)})
    send({"done": True, "peak_mb": peak_mb(device), "base_mb": base})


# ----------------------------------------------------------------------------------------------------
# TRL worker: GRPOTrainer.train(), paced by a callback
# ----------------------------------------------------------------------------------------------------
def trl_worker(a):
    import torch
    torch.set_num_threads(1)
    import datasets
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    cuda = a.device.startswith("cuda") or (a.device == "auto" and torch.cuda.is_available())
    device = "cuda" if cuda else "cpu"
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    texts = prompt_texts(a.model_dir, tok)
    ds = datasets.Dataset.from_list([{"prompt": t} for t in texts])  # plain-text prompts = dsrl's exact prompt
    T = a.new_tokens
    stats = {"pos": []}

    def reward_fn(prompts, completions, completion_ids, **kw):
        r = [hash_reward(ids, i % GROUP) for i, ids in enumerate(completion_ids)]
        stats["pos"].append(sum(r) / len(r))
        stats["gen_tokens"] = sum(len(ids) for ids in completion_ids)
        return r

    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_bench_"), report_to="none", save_strategy="no",
        logging_steps=10**6, log_completions=False, seed=0, use_cpu=not cuda, bf16=cuda,
        max_steps=a.warmup + a.steps, per_device_train_batch_size=N_PROMPTS * GROUP, gradient_accumulation_steps=1,
        num_generations=GROUP, max_completion_length=T, temperature=1.0, top_p=1.0, top_k=0,
        generation_kwargs={"min_new_tokens": T},  # full-length generation, as on the dsrl side
        beta=0.0, num_iterations=1, loss_type="dapo", epsilon=0.2, scale_rewards="group",
        mask_truncated_completions=False, learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.01, max_grad_norm=1.0, dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=reward_fn, args=cfg, train_dataset=ds, processing_class=tok)

    # time the generation part: TRL's single-turn generate wrapper (tokenize + model.generate + EOS mask)
    gen_time = {"s": 0.0}
    orig_gen = trainer._generate_single_turn

    def timed_gen(*args_, **kw):
        sync(device)
        t = time.perf_counter()
        out = orig_gen(*args_, **kw)
        sync(device)
        gen_time["s"] += time.perf_counter() - t
        return out
    trainer._generate_single_turn = timed_gen

    class Pace(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            line = sys.stdin.readline()
            if line.strip() != "go":
                raise SystemExit(0)
            gen_time["s"] = 0.0
            sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync(device)
            dt = time.perf_counter() - self.t0
            send({"step_s": dt, "gen_s": gen_time["s"], "pos_share": stats["pos"][-1] if stats["pos"] else None,
                  "gen_tokens": stats.get("gen_tokens")})

    trainer.add_callback(Pace())
    prompt_lens = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    send({"ready": True, "rss_mb": peak_mb("cpu"), "prompt_lens": prompt_lens, "trl": trl.__version__,
          "optim": cfg.optim})
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


def run_length(a, T, log_dir):
    common = ["--model-dir", a.model_dir, "--new-tokens", str(T), "--device", a.device, "--dtype", a.dtype,
              "--warmup", str(a.warmup), "--steps", str(a.steps), "--dsrl-micro-batch", str(a.dsrl_micro_batch),
              "--chunk", str(a.chunk)]
    specs = [(grpo_name(a, kv), a.dsrl_python, ["--worker", "dsrl", "--mode", "grpo", "--kv-cache", kv])
             for kv in a.kv_list]
    specs.append(("trl-grpo", a.trl_python, ["--worker", "trl"]))
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
            print(f"  T={T} step {i + 1:2d} {name:17s} {r['step_s']:7.3f}s  gen {r['gen_s']:7.3f}s  "
                  f"pos {r['pos_share']}", file=sys.stderr)
    out = {}
    for name, w in workers:
        w.send("quit")
        final = w.recv()
        w.p.wait()
        steps = res[name][a.warmup:]
        med = statistics.median(s["step_s"] for s in steps)
        gen = statistics.median(s["gen_s"] for s in steps)
        out[name] = {"step_s": med, "gen_s": gen, "rest_s": statistics.median(s["step_s"] - s["gen_s"] for s in steps),
                     "pos_share": statistics.mean(s["pos_share"] for s in steps), "peak_mb": final["peak_mb"],
                     "step_extra_mb": final["peak_mb"] - final["base_mb"], "gen_tokens": steps[-1]["gen_tokens"],
                     "prompt_lens": ready[name]["prompt_lens"], "all_steps": [round(s["step_s"], 4) for s in steps],
                     "warmup_steps": [round(s["step_s"], 4) for s in res[name][:a.warmup]]}
    assert out[grpo_name(a, a.kv_list[-1])]["prompt_lens"] == out["trl-grpo"]["prompt_lens"], "prompts differ between the systems"
    return out


def grpo_name(a, kv):
    return "dsrl-grpo" if len(a.kv_list) == 1 else f"dsrl-grpo-{kv}"


def main():
    ap = argparse.ArgumentParser(description="dsrl.py vs TRL GRPOTrainer: one training step")
    ap.add_argument("--new-tokens", default="64,256", help="comma list; each is a separate alternating run")
    ap.add_argument("--steps", type=int, default=5, help="measured steps per system (median)")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured steps per system first")
    ap.add_argument("--model-config", choices=["tiny", "qwen3-0.6b"], default="tiny")
    ap.add_argument("--model-dir", default="", help="use an existing model folder (built by this script)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="auto", help="dsrl --dtype (auto: fp32 on CPU, bf16 on GPU)")
    ap.add_argument("--dsrl-kv-cache", default="dynamic",
                    help="dsrl --kv-cache: dynamic, static or compile; a comma list runs one dsrl-GRPO worker each")
    ap.add_argument("--dsrl-micro-batch", "--micro-batch", dest="dsrl_micro_batch", type=int, default=N_PROMPTS * GROUP,
                    help="dsrl --micro-batch-size; default 32 = TRL's per_device_train_batch_size (sequences per "
                         "loss forward on the TRL side), so both sides forward the same 32 sequences at once")
    ap.add_argument("--chunk", type=int, default=0, help="dsrl --logprob-chunk (0: dsrl's default, 256)")
    ap.add_argument("--no-nsr", action="store_true", help="skip the dsrl NSR-PreRL worker")
    ap.add_argument("--dsrl-python", default=sys.executable, help="python of the main venv (dsrl, no trl needed)")
    ap.add_argument("--trl-python", default=SIDE_VENV_PY if os.path.exists(SIDE_VENV_PY) else sys.executable)
    ap.add_argument("--build-only", action="store_true", help="build the model folder and exit")
    ap.add_argument("--json", default="", help="also write all results here")
    # worker-only flags
    ap.add_argument("--worker", choices=["dsrl", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="grpo", help=argparse.SUPPRESS)
    ap.add_argument("--kv-cache", default="dynamic", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.kv_list = [k for k in a.dsrl_kv_cache.split(",") if k]
    bad = [k for k in a.kv_list if k not in ("dynamic", "static", "compile")]
    if bad or not a.kv_list:
        ap.error(f"--dsrl-kv-cache: expected dynamic, static or compile, got {a.dsrl_kv_cache!r}")
    if any(k != "dynamic" for k in a.kv_list + [a.kv_cache]) and a.warmup < 2:
        print(f"--warmup {a.warmup} raised to 2: compilation (static/compile KV cache) happens in the first steps",
              file=sys.stderr)
        a.warmup = 2
    if a.worker:
        a.new_tokens = int(a.new_tokens)
        return dsrl_worker(a) if a.worker == "dsrl" else trl_worker(a)

    if not a.model_dir:
        a.model_dir = tempfile.mkdtemp(prefix=f"bench_{a.model_config}_")
        t = time.time()
        subprocess.run([a.dsrl_python, "-c", f"import sys; sys.path.insert(0, {HERE!r}); import step_vs_trl as s; "
                        f"s.build_model({a.model_dir!r}, {a.model_config!r})"], check=True, cwd=REPO)
        print(f"model ({a.model_config}) built in {a.model_dir} in {time.time() - t:.0f}s", file=sys.stderr)
    if a.build_only:
        return
    log_dir = tempfile.mkdtemp(prefix="bench_logs_")
    print(f"worker logs: {log_dir}", file=sys.stderr)
    all_res = {}
    for T in [int(t) for t in a.new_tokens.split(",")]:
        all_res[T] = run_length(a, T, log_dir)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({str(k): v for k, v in all_res.items()}, fh, indent=1)

    mem = "peak GPU MB (max_memory_allocated)" if a.device.startswith("cuda") else "peak RSS MB"
    print(f"\n{a.model_config} model, {N_PROMPTS} prompts x {GROUP}, device {a.device}, 1 thread, "
          f"median of {a.steps} steps after {a.warmup} warm-up, alternating workers, dsrl micro-batch "
          f"{a.dsrl_micro_batch}, logprob chunk {a.chunk or 'dsrl default'}, NSR kv-cache {a.kv_list[-1]}")
    print(f"{'T':>4} {'system':17} {'step s':>8} {'gen s':>8} {'loss+upd s':>10} {'x TRL':>6} {'pos%':>5} "
          f"{mem:>12} {'step extra MB':>13} {'gen tok':>7}")
    for T, res in all_res.items():
        trl_s = res["trl-grpo"]["step_s"]
        for name, r in res.items():
            print(f"{T:4d} {name:17} {r['step_s']:8.3f} {r['gen_s']:8.3f} {r['rest_s']:10.3f} "
                  f"{r['step_s'] / trl_s:6.2f} {100 * r['pos_share']:5.1f} {r['peak_mb']:12.0f} "
                  f"{r['step_extra_mb']:13.0f} {r['gen_tokens']:7d}")
    T, res = list(all_res.items())[-1]
    d, t = res[grpo_name(a, a.kv_list[-1])], res["trl-grpo"]
    print(f"ratio={d['step_s'] / t['step_s']:.3f} dsrl_s={d['step_s']:.3f} trl_s={t['step_s']:.3f} "
          f"dsrl_peak_mb={d['peak_mb']:.0f} trl_peak_mb={t['peak_mb']:.0f}")


if __name__ == "__main__":
    main()
