"""One-shot GPU check of dsrl.py on the random-weight Qwen3-0.6B configuration, unattended, in under 10 minutes.

    bash bench/gpu_check.sh                  # one GPU: bench/results/gpu-<name>.json and gpu-<name>.md
    bash bench/gpu_check.sh --out-dir DIR    # the same, written to DIR
    bash bench/gpu_check.sh --tiny           # CPU, tiny model, seconds: the same code path (the tests run it)

Sections, each in its own process with its own time budget (a section that fails, runs out of memory or overruns
is recorded as such with the rows it finished, and the check goes on; the whole stays under --budget-s, 560 s by
default; --out-dir DIR names where the JSON and the Markdown go; torch and transformers are all it needs):
  info           device name, memory, the memory bandwidth (table of known cards) and a measured copy bandwidth
  phases         one GRPO training step (P(y|x)) at dsrl's default sizes (16 prompts x 8 samples, 1,024 new tokens,
                 micro-batch 8), after a short warm-up step that creates the AdamW state: time and peak memory of
                 sampling, loss (forward + backward) and optimizer step, against the memory plan (scale.memory_plan)
  decode         decode ms per step of the sampler (bf16 copy) at the default run's length (1,024 new tokens) and batch
                 (the memory plan's: 128 sequences where they fit) for each --kv-cache, median and spread of 3 calls,
                 against the bandwidth floor: (bytes of the sampler's weights + bytes of the KV cache at the mean
                 length) / bandwidth; the first call of each mode is a warm-up (static/compile compile there)
  deterministic  the same step as `phases` with --deterministic off and on, at 256 new tokens
  trl            bench/step_vs_trl.py at the default sizes, when TRL is installed (see bench/README.md, Setup)
  headline       python dsrl.py --model <random Qwen3-0.6B> with the default flags (--max-new-tokens 1024), stopped
                 after 10 steps as a user stops it (SIGTERM: the step ends, a checkpoint is written), or earlier
                 when its budget runs out (the report says so)
Reward: random weights never write a boxed answer, so every reward would be 0, every advantage 0, and the loss pass
would never run. Every section scores responses with a 0/1 hash of (position, text) instead (as step_vs_trl
--reward hash), so groups are mixed and the loss runs as in a real run.
"""
import argparse
import datetime
import hashlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, HERE]
import step_vs_trl as svt  # noqa: E402  (build_model, load_examples, sync: the benchmark's own helpers)
import offline_model  # noqa: E402  (the random-weight models, without pytest)

TOTAL_BUDGET_S = 560  # 9 min 20 s: with the model build and the report, under the 10 minutes of one command
# seconds a section may take at most; the headline gets what is left, at least HEADLINE_MIN_S
BUDGETS = {"info": 40, "phases": 90, "decode": 300, "deterministic-off": 40, "deterministic-on": 40, "trl": 120}
HEADLINE_MIN_S = 100
DECODE_REPS = 3  # timed generate calls per --kv-cache (after a warm-up): median and spread
SIZES = {  # dsrl's defaults on GPU; seconds-long on CPU
    "gpu": dict(prompts=16, group=8, new_tokens=1024, micro=8, warmup_tokens=16, decode_tokens=1024, det_tokens=256,
                headline_steps=10, kv_caches=["dynamic", "static", "compile"]),
    "tiny": dict(prompts=2, group=4, new_tokens=16, micro=4, warmup_tokens=4, decode_tokens=8, det_tokens=8,
                 headline_steps=2, kv_caches=["dynamic", "static"]),  # compile: minutes on a CPU
}
# Memory bandwidth in GB/s of common cards (vendors' figures), matched in this order on the device name
BANDWIDTH_GBS = [("H200", 4800), ("H100 NVL", 3900), ("H100 PCIe", 2000), ("H100", 3350), ("GH200", 4000),
                 ("A100-SXM4-80GB", 2039), ("A100 80GB PCIe", 1935), ("A100", 1555), ("L40S", 864), ("L40", 864),
                 ("A10G", 600), ("A10", 600), ("L4", 300), ("RTX 4090", 1008), ("RTX 3090", 936),
                 ("RTX A6000", 768), ("RTX 6000 Ada", 960), ("V100", 900), ("T4", 320)]


# ---- helpers shared by the sections --------------------------------------------------------------------------
def hash_score(texts, golds=None, kind=None):
    """dsrl.score's interface, with a deterministic 0/1 hash of (position, text) as the reward (see the docstring)."""
    import dsrl
    rewards = [float(hashlib.md5(f"{i}:{t}".encode()).digest()[0] < 128) for i, t in enumerate(texts)]
    outcomes = {o: 0 for o in dsrl.REWARD_OUTCOMES}
    outcomes.update(right=int(sum(rewards)), wrong=len(rewards) - int(sum(rewards)))
    return rewards, outcomes


def write_json(path, obj):
    with open(path + ".tmp", "w") as fh:
        json.dump(obj, fh)
    os.replace(path + ".tmp", path)  # a kill never leaves half a file


def reset_peak(device):
    import torch
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:  # Linux: "5" resets the peak resident set size (VmHWM) to the current one
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            pass


def peak_mb(device):
    import torch
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024


def now_mb(device):
    import torch
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024


def trainer_args(o, **kw):
    import dsrl
    s = SIZES[o.size]
    return dsrl.Args(model=o.model_dir, mode="grpo", prompts_per_step=s["prompts"], group_size=s["group"],
                     max_new_tokens=s["new_tokens"], micro_batch_size=s["micro"], device=o.device, **kw)


def memory_plan(config, args, device):
    """scale.memory_plan where it exists (bytes), else None: the report then says "plan: not available"."""
    try:
        import scale
    except ImportError:
        return None
    import torch
    # the weights are on the device already: the plan counts them itself, so give it the memory before them
    free = torch.cuda.mem_get_info()[0] + torch.cuda.memory_allocated() if device.startswith("cuda") else None
    import dsrl  # the run's compute path: device, dtype and checkpointing as the trainer resolves them
    device = dsrl.resolve_device(device)
    return scale.memory_plan(config, args, free, device, dsrl.resolve_dtype(args.dtype, device),
                             dsrl.use_checkpointing(args, device))


def load(o, deterministic=False):
    import torch
    import dsrl
    if deterministic:  # as dsrl.start_run: before CUDA starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    device = dsrl.resolve_device(o.device)
    model, tokenizer = dsrl.load_model_and_tokenizer(o.model_dir, device)
    return device, model, tokenizer


# ---- sections (each runs in its own process: python bench/gpu_check.py --section NAME) -----------------------
def section_info(o):
    import torch
    import transformers
    device = "cuda" if torch.cuda.is_available() and o.device != "cpu" else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    nbytes = (1 << 30) if device == "cuda" else (64 << 20)
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    svt.sync(device)
    t0 = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    svt.sync(device)
    copy_gbs = 5 * 2 * nbytes / (time.perf_counter() - t0) / 1e9  # each copy reads and writes nbytes
    table = next((gbs for key, gbs in BANDWIDTH_GBS if key in name), None)
    return {"device": name, "total_memory_mb": torch.cuda.get_device_properties(0).total_memory / 2**20
            if device == "cuda" else None, "bandwidth_table_gbs": table, "copy_bandwidth_gbs": copy_gbs,
            "bandwidth_gbs": table or copy_gbs, "bf16_supported": torch.cuda.is_bf16_supported() if device == "cuda"
            else None, "torch": torch.__version__, "transformers": transformers.__version__}


def one_step(o, run, args, new_tokens, phases):
    """The trainer's step (dsrl.train: sample, reward, advantages, mask, loss, update, re-sync), phase by phase."""
    import dsrl
    device, model, gen_model, tokenizer, optimizer, examples, start_id, pad, dtype = run
    out = {}

    def phase(name, fn):
        svt.sync(device)
        reset_peak(device)
        t0 = time.perf_counter()
        value = fn()
        svt.sync(device)
        if phases:
            out[name] = {"s": time.perf_counter() - t0, "peak_mb": peak_mb(device)}
        return value

    prompt_ids = [dsrl.build_prompt(tokenizer, ex["messages"], args.max_prompt_tokens) for ex in examples]
    t0 = time.perf_counter()
    responses, _ = phase("sampling", lambda: dsrl.sample_responses(
        gen_model, tokenizer, prompt_ids, args.group_size, new_tokens, args.temperature, args.top_p,
        args.gen_batch_size, dtype=dtype, kv_cache=args.kv_cache))
    rewards, _ = hash_score(tokenizer.batch_decode(responses, skip_special_tokens=True))
    ph = dsrl.phase_for_step(args.mode, 1, args.warmup_steps, args.prerl_coef)
    adv = dsrl.group_advantages(rewards, args.group_size, ph.use_std)
    batch = dsrl.Batch([p for p in prompt_ids for _ in range(args.group_size)], responses, adv,
                       dsrl.sample_mask(adv, ph.samples))
    _, active, *_ = phase("loss", lambda: dsrl.policy_loss_backward(model, batch, ph, args, start_id, pad))
    phase("optimizer", lambda: dsrl.optimizer_step(model, optimizer, args.grad_clip))
    dsrl.sync_generation_copy(gen_model, model)
    svt.sync(device)
    return {"step_s": time.perf_counter() - t0, "gen_tokens": sum(map(len, responses)), "n_used": len(active),
            **({"phases": out} if phases else {})}


def train_step_section(o, deterministic, new_tokens, phases):
    import torch
    import dsrl
    device, model, tokenizer = load(o, deterministic)
    args = trainer_args(o, deterministic=deterministic)
    plan = memory_plan(model.config, args, device) if phases else None
    if plan and plan.get("gen_batch_size"):
        args.gen_batch_size = plan["gen_batch_size"]
    dtype = dsrl.resolve_dtype(args.dtype, device)
    gen_model = dsrl.generation_copy(model, dtype)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    run = (device, model, gen_model, tokenizer, optimizer, svt.load_examples(o.model_dir, args.prompts_per_step),
           dsrl.token_id(tokenizer, dsrl.START_TOKEN), dsrl.pad_id(tokenizer), dtype)
    loaded_mb = now_mb(device)
    one_step(o, run, args, SIZES[o.size]["warmup_tokens"], phases=False)  # AdamW state, kernels, allocator
    step = one_step(o, run, args, new_tokens, phases)
    return {"deterministic": torch.are_deterministic_algorithms_enabled(), "new_tokens": new_tokens,
            "prompts": args.prompts_per_step, "group_size": args.group_size, "micro_batch": args.micro_batch_size,
            "gen_batch_size": args.gen_batch_size, "dtype": str(dtype), "loaded_mb": loaded_mb, "plan": plan, **step}


def section_phases(o):
    return train_step_section(o, False, SIZES[o.size]["new_tokens"], phases=True)


def section_deterministic(o, on):
    return train_step_section(o, on, SIZES[o.size]["det_tokens"], phases=False)


def section_decode(o):
    """ms per decode step of the default run's generate call (1,024 new tokens forced, the batch the memory plan
    gives `python dsrl.py` on this device: 128 sequences where they fit) for each --kv-cache: DECODE_REPS timed
    calls after an untimed warm-up (static and compile compile there), median and spread. Each repetition is
    written as it finishes, so a mode that crashes or overruns keeps what it measured."""
    import torch
    import dsrl
    s, info = SIZES[o.size], json.loads(o.info) if o.info else {}
    device, model, tokenizer = load(o)
    dtype = dsrl.resolve_dtype("auto", device)
    args = trainer_args(o)
    plan = memory_plan(model.config, args, device)
    n_seq = plan["gen_batch_size"] if plan else s["prompts"] * s["group"]
    gen_model = dsrl.generation_copy(model, dtype)
    if gen_model is not model:
        del model
    examples = svt.load_examples(o.model_dir, max(1, n_seq // s["group"]))
    prompts = [dsrl.build_prompt(tokenizer, ex["messages"], args.max_prompt_tokens) for ex in examples]
    cfg, item = gen_model.config, torch.empty((), dtype=dtype).element_size()
    weight_bytes = sum(p.numel() for p in gen_model.parameters()) * item
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * item
    n_seq, T = len(prompts) * s["group"], s["decode_tokens"]
    mean_len = sum(map(len, prompts)) / len(prompts) + T / 2  # the KV cache read per step, averaged over the decode
    bandwidth = info.get("bandwidth_gbs") or float("nan")  # nan if the info section failed
    floor_ms = 1000 * (weight_bytes + n_seq * mean_len * kv_per_token) / (bandwidth * 1e9)
    rows = {kv: {"status": "not run: the section's time budget ran out"} for kv in s["kv_caches"]}
    rows.update({kv: {"status": "not run in --tiny: compiling takes minutes on a CPU"}
                 for kv in SIZES["gpu"]["kv_caches"] if kv not in rows})
    result = {"batch": n_seq, "new_tokens": T, "reps": DECODE_REPS, "dtype": str(dtype), "weight_bytes": weight_bytes,
              "kv_bytes_per_token": kv_per_token, "mean_kv_len": mean_len, "bandwidth_gbs": info.get("bandwidth_gbs"),
              "transformers_expands_kv": {kv: scale_expands(kv) for kv in rows}, "kv_cache": rows}

    def generate(kv, tokens):
        svt.sync(device)
        t0 = time.perf_counter()
        torch.manual_seed(0)
        dsrl.sample_responses(gen_model, tokenizer, prompts, s["group"], tokens, min_new_tokens=tokens, dtype=dtype,
                              kv_cache=kv)
        svt.sync(device)
        return time.perf_counter() - t0

    for kv in s["kv_caches"]:
        if time.time() > o.deadline - 15:
            break
        try:  # a mode that fails (a compile error, out of memory) is recorded; the next one still runs
            warmup = generate(kv, T if kv != "dynamic" else s["warmup_tokens"])  # a static cache's shape: full length
            reps = []
            for _ in range(DECODE_REPS):
                reps.append(1000 * generate(kv, T) / T)
                med = statistics.median(reps)
                rows[kv] = {"status": "ok" if len(reps) == DECODE_REPS else f"{len(reps)} of {DECODE_REPS} repetitions",
                            "warmup_s": warmup, "reps_ms_per_step": reps, "ms_per_step": med, "min_ms": min(reps),
                            "max_ms": max(reps), "spread_pct": 100 * (max(reps) - min(reps)) / med,
                            "floor_ms": floor_ms, "x_floor": med / floor_ms}
                write_json(o.result, result)  # kept if a later repetition or mode crashes or outlasts the budget
        except Exception as e:  # noqa: BLE001
            first = str(e).splitlines()[0][:120] if str(e) else ""
            rows[kv] = {**rows[kv], "status": f"failed: {type(e).__name__}: {first}"}
            write_json(o.result, result)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return result


def scale_expands(kv):
    """Whether this transformers copies keys and values to every head at each decode step (scale.decode_expands_kv)."""
    try:
        import scale
        return scale.decode_expands_kv(kv)
    except (ImportError, AttributeError):
        return None


def section_trl(o):
    s = SIZES[o.size]
    trl_python = os.environ.get("TRL_PYTHON", svt.SIDE_VENV_PY if os.path.exists(svt.SIDE_VENV_PY) else sys.executable)
    found = subprocess.run([trl_python, "-c", "import importlib.util as u; print(u.find_spec('trl') is not None)"],
                           capture_output=True, text=True)
    if found.stdout.strip() != "True":
        return {"status": "not run: TRL is not installed (bench/README.md, Setup; or set TRL_PYTHON)"}
    out = os.path.join(o.work_dir, "trl.json")
    cmd = [sys.executable, os.path.join(HERE, "step_vs_trl.py"), "--model-dir", o.model_dir, "--device", o.device,
           "--prompts", str(s["prompts"]), "--new-tokens", str(s["new_tokens"]), "--micro-batch", str(s["micro"]),
           "--steps", "1", "--warmup", "1", "--no-nsr", "--reward", "hash", "--trl-python", trl_python, "--json", out]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1, o.deadline - time.time()))
    if res.returncode:
        return {"status": "failed", "error": (res.stderr.strip().splitlines() or ["?"])[-1]}
    with open(out) as fh:
        return {"command": " ".join(cmd[1:]), "result": json.load(fh)}


def section_headline(o):
    """`python dsrl.py --model <random Qwen3-0.6B>` with the default flags (348 steps, warm-up 19: a bare --steps 10
    is refused), run through dsrl.py's own main() and stopped after SIZES' headline_steps (10) as a user stops it:
    SIGTERM, the step in flight ends, a checkpoint is written. SIGTERM comes earlier if the budget runs out.
    Reward: the hash (see the docstring)."""
    import dsrl
    s = SIZES[o.size]
    out_dir = os.path.join(o.work_dir, "headline")
    argv = ["--model", o.model_dir, "--dataset", os.path.join(o.model_dir, "rows.jsonl"), "--output-dir", out_dir,
            "--max-new-tokens", str(s["new_tokens"])]
    if o.size == "tiny":
        argv += ["--prompts-per-step", str(s["prompts"]), "--group-size", str(s["group"]), "--device", o.device]
    dsrl.score = hash_score
    metrics_row = dsrl.metrics_row

    def stop_after_planned_steps(step, *rest):  # SIGTERM in the step's own logging: the loop stops after this step
        if step >= s["headline_steps"]:
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics_row(step, *rest)

    dsrl.metrics_row = stop_after_planned_steps
    budget = o.deadline - time.time() - o.step_estimate_s - 45  # the step in flight ends, the checkpoint is written
    timer = threading.Timer(max(0.0, budget), os.kill, (os.getpid(), signal.SIGTERM))
    timer.daemon = True
    timer.start()
    t0 = time.perf_counter()
    code = dsrl.main(argv)
    timer.cancel()
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    return {"command": "python dsrl.py " + " ".join(argv), "exit_code": code, "wall_s": time.perf_counter() - t0,
            "steps_planned": s["headline_steps"], "steps_done": len(rows),
            "stopped_by_budget": len(rows) < s["headline_steps"], "peak_mb": peak_mb(dsrl.resolve_device(o.device)),
            "steps": [{k: r[k] for k in ("step", "space", "n_used", "gen_tokens", "time_gen_s", "time_step_s")}
                      for r in rows]}


SECTIONS = {"info": section_info, "phases": section_phases, "decode": section_decode,
            "deterministic-off": lambda o: section_deterministic(o, False),
            "deterministic-on": lambda o: section_deterministic(o, True), "trl": section_trl,
            "headline": section_headline}


# ---- the driver: build the model, run each section in a subprocess with its budget, write JSON + Markdown -----
def run_section(o, name, budget_s, extra=()):
    path = os.path.join(o.work_dir, f"{name}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--section", name, "--model-dir", o.model_dir, "--device",
           o.device, "--work-dir", o.work_dir, "--deadline", str(time.time() + budget_s), "--result", path,
           *(["--tiny"] if o.tiny else []), *extra]
    t0 = time.time()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=budget_s)
    except subprocess.TimeoutExpired:
        timed_out = {"status": f"timed out after its budget of {budget_s:.0f} s", "section_s": time.time() - t0}
        if os.path.exists(path):  # what the section had finished (decode: one row per --kv-cache)
            with open(path) as fh:
                return {**json.load(fh), "status": "ok", "partial": timed_out["status"], "section_s": timed_out["section_s"]}
        return timed_out
    if res.returncode or not os.path.exists(path):
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        oom = "out of memory" in res.stderr.lower()
        failed = {"status": "out of memory" if oom else "failed",
                  "error": lines[-1] if lines else f"exit {res.returncode}", "section_s": time.time() - t0}
        if os.path.exists(path):  # the rows it finished before it crashed (decode: one per --kv-cache and repetition)
            with open(path) as fh:
                return {**json.load(fh), **failed, "status": "ok", "partial": f"crashed: {failed['status']}"}
        return failed
    with open(path) as fh:
        return {"status": "ok", **json.load(fh), "section_s": time.time() - t0}


def build(o):
    """The random-weight model (offline_model.py: torch and transformers only, no test code) and its problems."""
    offline_model.build(o.model_dir, "tiny" if o.tiny else "qwen3-0.6b")
    svt.write_rows(o.model_dir)
    with open(os.path.join(o.model_dir, svt.ROWS_FILE)) as fh, open(os.path.join(o.model_dir, "rows.jsonl"), "w") as out:
        out.writelines(json.dumps(r) + "\n" for r in json.load(fh))  # the headline's --dataset (verl format)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU, tiny model, tiny sizes: the same code path in seconds")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"), help="where gpu-<name>.json and .md go")
    p.add_argument("--budget-s", type=float, default=TOTAL_BUDGET_S, help="the whole check's time limit")
    p.add_argument("--device", default="", help="default: cuda (cpu with --tiny)")
    p.add_argument("--model-dir", default="", help=argparse.SUPPRESS)
    p.add_argument("--work-dir", default="", help=argparse.SUPPRESS)
    p.add_argument("--section", choices=list(SECTIONS), help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    p.add_argument("--info", default="", help=argparse.SUPPRESS)
    p.add_argument("--step-estimate-s", type=float, default=60.0, help=argparse.SUPPRESS)
    o = p.parse_args()
    o.size, o.device = ("tiny" if o.tiny else "gpu"), o.device or ("cpu" if o.tiny else "cuda")
    if o.section:  # a child: one section, its result as JSON
        write_json(o.result, SECTIONS[o.section](o))
        return 0
    return drive(o)


def drive(o):
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        o.work_dir, o.model_dir = work, o.model_dir or os.path.join(work, "model")
        info = run_section(o, "info", BUDGETS["info"])  # first: a machine without a GPU stops before the build
        if not o.tiny and info.get("device", "cpu") == "cpu":
            print(f"error: {info.get('error') or 'no CUDA device found'}; the CPU version of this check is: "
                  "bash bench/gpu_check.sh --tiny", file=sys.stderr)
            return 2
        if not os.path.exists(os.path.join(o.model_dir, "config.json")):
            build(o)
        report = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  "command": "bash bench/gpu_check.sh" + (" --tiny" if o.tiny else ""), "sizes": SIZES[o.size],
                  "budget_s": o.budget_s, "build_s": time.time() - t_start, "sections": {"info": info}}
        run_sections(o, report["sections"], t_start)
        report["total_s"] = time.time() - t_start
    name = "cpu-tiny" if o.tiny else re.sub(r"[^a-z0-9]+", "-", info["device"].lower()).strip("-")
    os.makedirs(o.out_dir, exist_ok=True)
    with open(os.path.join(o.out_dir, f"gpu-{name}.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    table = markdown(report)
    with open(os.path.join(o.out_dir, f"gpu-{name}.md"), "w") as fh:
        fh.write(table)
    print(table)
    print(f"wrote {o.out_dir}/gpu-{name}.json and .md in {report['total_s']:.0f} s", file=sys.stderr)
    return 0


def run_sections(o, sections, t_start):
    """Each section within its budget and what the whole check has left, keeping HEADLINE_MIN_S for the headline."""
    factor = o.budget_s / TOTAL_BUDGET_S
    for name in [n for n in BUDGETS if n != "info"]:
        left = o.budget_s - (time.time() - t_start) - HEADLINE_MIN_S * factor
        if left < 10 * factor:
            sections[name] = {"status": "not run: the check's time budget ran out"}
            continue
        extra = ["--info", json.dumps({"bandwidth_gbs": sections["info"].get("bandwidth_gbs")})] if name == "decode" else []
        sections[name] = run_section(o, name, min(BUDGETS[name] * factor, left), extra)
        print(f"[gpu_check] {name}: {sections[name]['status']} ({time.time() - t_start:.0f} s)", file=sys.stderr)
    step_s = sections["phases"].get("step_s") or 60.0 * factor  # the headline stops in time to finish its step
    sections["headline"] = run_section(o, "headline", o.budget_s - (time.time() - t_start),
                                       ["--step-estimate-s", f"{step_s:.1f}"])


# ---- the report -----------------------------------------------------------------------------------------------
def fmt(x, spec=".2f"):
    return "-" if x is None or (isinstance(x, float) and x != x) else format(x, spec)


def not_ok(title, sec):
    return [f"**{title}**: {sec['status']}" + (f" ({sec['error']})" if sec.get("error") else ""), ""]


def md_decode(sec):
    title = "Decode ms per step, against the bandwidth floor"
    if sec["status"] != "ok":
        return not_ok(title, sec)
    lines = [f"**{title}** ({sec['batch']} sequences, {sec['new_tokens']} new tokens forced, {sec['dtype']} sampler, "
             f"median of {sec['reps']} calls after a warm-up; floor = ({sec['weight_bytes'] / 1e9:.2f} GB weights + KV "
             f"cache at {sec['mean_kv_len']:.0f} tokens) / {fmt(sec['bandwidth_gbs'], '.0f')} GB/s; prefill included "
             f"in ms/step{'; ' + sec['partial'] if sec.get('partial') else ''})", "",
             "| `--kv-cache` | ms/step (median) | min-max | spread | floor ms | x floor | keys/values expanded "
             "per step | first call s (warm-up, compile) |", "|---|---|---|---|---|---|---|---|"]
    expands = sec.get("transformers_expands_kv", {})
    for kv, row in sec["kv_cache"].items():
        lines.append(f"| {kv} | {fmt(row.get('ms_per_step'))} | {fmt(row.get('min_ms'))}-{fmt(row.get('max_ms'))} | "
                     f"{fmt(row.get('spread_pct'), '.1f')} % | {fmt(row.get('floor_ms'), '.3f')} | "
                     f"{fmt(row.get('x_floor'), '.1f')} | {expands.get(kv, '-')} | {fmt(row.get('warmup_s'), '.1f')} |"
                     + (f" {row['status']}" if row["status"] != "ok" else "") if row.get("reps_ms_per_step")
                     else f"| {kv} | {row['status']} | | | | | | |")
    return lines + [""]


def md_phases(sec):
    title = "One GRPO step at the default sizes: time and peak memory per phase, against the memory plan"
    if sec["status"] != "ok":
        return not_ok(title, sec)
    plan = sec["plan"]
    mb = (lambda *keys: sum(plan[k] for k in keys) / 2**20) if plan else (lambda *keys: None)
    planned = {"sampling": mb("training_state", "sampling_copy", "kv_cache"),
               "loss": mb("training_state", "sampling_copy", "activations"),
               "optimizer": mb("training_state", "sampling_copy")}
    lines = [f"**{title}** ({sec['prompts']} x {sec['group_size']} sequences, {sec['new_tokens']} new tokens, "
             f"micro-batch {sec['micro_batch']}, generation batch {sec['gen_batch_size'] or 'all'}, {sec['dtype']} "
             f"compute; step {sec['step_s']:.2f} s; {sec['n_used']} samples in the loss; after loading "
             f"{sec['loaded_mb']:.0f} MB){'' if plan else '; plan: not available'}", "",
             "| phase | s | peak MB | plan MB | peak / plan |", "|---|---|---|---|---|"]
    for name, row in sec["phases"].items():
        p = planned[name]
        lines.append(f"| {name} | {row['s']:.2f} | {row['peak_mb']:.0f} | {fmt(p, '.0f')} | "
                     f"{fmt(row['peak_mb'] / p if p else None)} |")
    whole = max(row["peak_mb"] for row in sec["phases"].values())
    p = plan["peak"] / 2**20 if plan else None
    return lines + [f"| whole step | {sec['step_s']:.2f} | {whole:.0f} | {fmt(p, '.0f')} | "
                    f"{fmt(whole / p if p else None)} |", ""]


def md_deterministic(off, on):
    title = "`--deterministic` off and on"
    rows = []
    for label, sec in (("off", off), ("on", on)):
        rows.append(f"| {label} | {fmt(sec.get('step_s'))} | {sec.get('new_tokens', '-')} | "
                    f"{'ok' if sec['status'] == 'ok' else sec['status']} |")
    ratio = on["step_s"] / off["step_s"] if off["status"] == on["status"] == "ok" else None
    return [f"**{title}** (one GRPO step after a warm-up step; on / off = {fmt(ratio)})", "",
            "| `--deterministic` | step s | new tokens | status |", "|---|---|---|---|", *rows, ""]


def md_trl(sec):
    title = "Step time against TRL"
    if sec["status"] != "ok" or "result" not in sec:
        return not_ok(title, sec)
    lines = [f"**{title}** (`python {sec['command']}`)", "", "| system | step s | generation s | loss+update s | peak MB |",
             "|---|---|---|---|---|"]
    for T, systems in sec["result"].items():
        if isinstance(systems, dict) and T.isdigit():
            for name, r in systems.items():
                lines.append(f"| {name} (T={T}) | {r['step_s']['median']:.2f} | {r['gen_s']:.2f} | {r['rest_s']:.2f} | "
                             f"{r['peak_mb']:.0f} |")
    return lines + [""]


def md_headline(sec):
    title = "The headline command"
    if sec["status"] != "ok":
        return not_ok(title, sec)
    steps = sec["steps"]
    med = lambda key: statistics.median(s[key] for s in steps) if steps else None  # noqa: E731
    return [f"**{title}** (`{sec['command']}`, reward: the hash; exit code {sec['exit_code']})", "",
            "| steps done | median step s | median generation s | tokens per step | peak MB | stopped by the budget |",
            "|---|---|---|---|---|---|",
            f"| {sec['steps_done']} of {sec['steps_planned']} | {fmt(med('time_step_s'))} | {fmt(med('time_gen_s'))} | "
            f"{fmt(med('gen_tokens'), '.0f')} | {sec['peak_mb']:.0f} | {'yes' if sec['stopped_by_budget'] else 'no'} |", ""]


def markdown(r):
    s, info = r["sections"], r["sections"]["info"]
    head = [f"#### {info.get('device', 'device unknown')}, {r['date']}", "",
            f"`{r['command']}`: {r['total_s']:.0f} s in all (model build {r['build_s']:.0f} s); torch "
            f"{info.get('torch', '?')}, transformers {info.get('transformers', '?')}; memory bandwidth "
            f"{fmt(info.get('bandwidth_table_gbs'), '.0f')} GB/s (card's figure), measured copy "
            f"{fmt(info.get('copy_bandwidth_gbs'), '.0f')} GB/s", ""]
    if info["status"] != "ok":
        head += not_ok("Device", info)
    return "\n".join(head + md_decode(s["decode"]) + md_phases(s["phases"])
                     + md_deterministic(s["deterministic-off"], s["deterministic-on"]) + md_trl(s["trl"])
                     + md_headline(s["headline"]))


if __name__ == "__main__":
    sys.exit(main())
