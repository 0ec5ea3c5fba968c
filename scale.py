"""scale.py - where a run fits: one GPU's memory plan, then the launch beyond one GPU.

It holds what is not the method (dsrl.py is) but decides where the method can run:
 1. One GPU: the memory plan. `python dsrl.py --plan [flags]` prints it and exits; every training run prints it
    before the first step. It is computed by formula from the model's config.json and the flags: nothing is
    allocated, no weights are read. It also resolves `--gen-batch-size 0` ("auto").
 2. Beyond one GPU: the official multi-GPU launch (the verl fork, 8 GPUs, vLLM) of the same experiment.
    `python dsrl.py --print-verl-command ...` prints it; README.md, "From one GPU to the official launch".
And what a run reads before anything else: a 5-second look at the Hugging Face Hub for the hub ids in the flags
(`hub_reachable`, not half a minute of the client's retries), and the rows of a data file or hub dataset
(`read_rows`: .parquet, .jsonl, .json, .csv; dsrl.py turns them into problems, the launch counts them).

dsrl.py imports this module; this module imports nothing of the project: it takes the run's settings (dsrl.Args)
and the mode table as arguments, and raises ValueError with one line for settings that cannot run, which dsrl.py
reports as a usage error (exit code 2). The compute dtype, the device and the gradient checkpointing of the loss
are the method's compute path: dsrl.py resolves them and passes them in.
"""

import csv
import json
import math
import os
import re
import shlex
import sys
import urllib.request
from dataclasses import fields, replace

import torch

# ---- One GPU: the memory plan -------------------------------------------------------------------------------
GiB = 2 ** 30
SAMPLER_LOGIT_COPIES = 4  # generate's per-step fp32 logits, scores, probabilities and top-p mask: (n, vocab) each
CHUNK_COPIES = 4  # a vocabulary chunk's backward holds 3 (chunk, vocab) fp32 copies; 4 keeps the loss peak measured
                  # without checkpointing at 1.02 of the plan, not 1.05 (bench/plan_vs_measured.py)
MARGIN = 0.10  # auto sizing and the flags the plan proposes leave this share of free memory unplanned (fragmentation)
GQA_DECODE_FROM = (5, 23)  # transformers from 5.23 attends a decode step's query to the KV heads as cached


NO_HUB = "cannot reach the Hugging Face Hub; give a local path or try again (HF_HUB_OFFLINE=1: the local cache)"


def hub_reachable(*names, timeout=5) -> bool:
    """False if one of `names` is a hub id (not a path) and the Hugging Face Hub does not answer within `timeout`
    seconds: its client would retry for half a minute, then call the id a missing model. Offline mode: True."""
    from huggingface_hub import constants
    hub_ids = [n for n in names if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", n) and not os.path.exists(n)
               and not n.endswith((".parquet", ".jsonl", ".json", ".csv"))]
    if constants.HF_HUB_OFFLINE or not hub_ids:
        return True
    try:
        urllib.request.urlopen(constants.ENDPOINT, timeout=timeout).close()
    except urllib.error.HTTPError:
        pass  # an answer, even an error page: the hub is there
    except OSError:  # no route, refused, no DNS, timed out
        return False
    return True


def read_rows(source: str, split: str = "train") -> list:
    """Rows of a local .parquet/.jsonl/.json/.csv file, or of a hub dataset split."""
    if not (source.endswith((".parquet", ".jsonl", ".json", ".csv")) or os.sep in source and os.path.exists(source)):
        try:
            import datasets
            return datasets.load_dataset(source, split=split).to_list()
        except Exception as e:
            raise ValueError(f"cannot load dataset '{source}' from the hub ({type(e).__name__}); "
                             "check the id or give a local .parquet/.jsonl file")
    if not os.path.isfile(source):
        raise ValueError(f"dataset file not found: {source} (give an existing .parquet/.jsonl file or a hub id)")
    try:
        if source.endswith(".parquet"):
            import pyarrow.parquet as pq  # comes with datasets; only .parquet files need it
            return pq.read_table(source).to_pylist()
        with open(source, encoding="utf-8", newline="") as fh:
            if source.endswith(".csv"):  # each cell as written: a gold "0.50" stays "0.50"
                return list(csv.DictReader(fh, restkey="__malformed__"))
            text = fh.read()
        lines = json.loads(text) if text.lstrip().startswith("[") else text.split("\n")  # .json: one array of rows
        return [_json_row(line, n) for n, line in enumerate(lines, 1) if not isinstance(line, str) or line.strip()]
    except Exception as e:
        raise ValueError(f"cannot read dataset file {source}: {type(e).__name__}: {str(e)[:200]} "
                         "(is it a valid parquet/jsonl file?)")


def _json_row(line, n):  # a line of a .jsonl file, or a row of a .json array -> dict
    try:
        row = json.loads(line) if isinstance(line, str) else line
    except json.JSONDecodeError:
        row = None
    return row if isinstance(row, dict) else {"__malformed__": f"line {n}"}  # counted as malformed, never trained on

def model_config(name_or_path):
    """The model's config.json from a local folder or the hub; no weights are read. -> config or None."""
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except Exception:
        return None


def count_parameters(config) -> int:
    """Parameters of a Qwen3/Qwen2/Llama-style decoder, by formula (counting them on the meta device takes
    seconds); tied input and output embeddings count once."""
    layers, hidden, inter, q, kv, heads, _, vocab = body_sizes(config)
    attention = hidden * (q + 2 * kv) + q * hidden
    if getattr(config, "attention_bias", False) or config.model_type == "qwen2":  # biases of q, k and v
        attention += q + 2 * kv
    if config.model_type == "qwen3":  # RMSNorm of each query and key head
        attention += 2 * (q // heads)
    per_layer = attention + 3 * hidden * inter + 2 * hidden  # + gate, up, down projections and two norms
    return layers * per_layer + vocab * hidden * (1 if config.tie_word_embeddings else 2) + hidden


def body_sizes(config):
    """(layers, hidden, intermediate, query width, key/value width, heads, kv heads, vocab) of a decoder config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return (config.num_hidden_layers, config.hidden_size, config.intermediate_size, heads * head_dim,
            kv_heads * head_dim, heads, kv_heads, config.vocab_size)


def kv_cache_bytes(config, n_seqs, n_tokens, elem):
    """Keys and values of every layer for n_seqs sequences of n_tokens, elem bytes per number (compute dtype)."""
    layers, _, _, _, kv, _, _, _ = body_sizes(config)
    return n_seqs * n_tokens * layers * 2 * kv * elem


def layer_bytes_per_token(config, elem, attended):
    """Bytes autograd keeps per token in one decoder layer (Qwen3/Llama layout), counted from the tensors saved
    for backward: two RMSNorms (input, 1/rms, normalised, the cast inputs of the linears), q/k with their norms,
    the GQA-expanded keys and values over the `attended` tokens per token, attention output and log-sum-exp, the
    MLP's gate, up, activation and product. Norms and their inputs stay fp32 under bf16 autocast."""
    _, hidden, inter, q, kv, heads, kv_heads, _ = body_sizes(config)
    linear_inputs = 5 if elem == 2 else 2  # autocast casts the norm output once per q/k/v/gate/up projection
    norms = 2 * (4 * 2 * hidden + 4) + linear_inputs * elem * hidden
    qk = (4 + elem) * (q + kv) + 4 * (heads + kv_heads) if elem == 2 else 4 * 2 * (q + kv) + 4 * (heads + kv_heads)
    attention = elem * (2 * q + 2 * q * attended) + 4 * heads
    return norms + qk + attention + 4 * elem * inter


def activation_bytes(config, n_seqs, n_prompts, prompt_len, response_len, elem, checkpointing):
    """Activations of one P(y|x) loss micro-batch at the start of backward: what the forward keeps, and with
    checkpointing one recomputed layer. The prompt pass is never checkpointed (it writes the KV cache the
    response pass reads); a checkpointed layer keeps only its fp32 input."""
    layers, hidden, _, _, _, _, _, _ = body_sizes(config)
    response_tokens, prompt_tokens = n_seqs * response_len, n_prompts * prompt_len
    per_response = layer_bytes_per_token(config, elem, (prompt_len + response_len) / response_len)
    prompt = prompt_tokens * layers * layer_bytes_per_token(config, elem, 1)
    body = layers * response_tokens * (4 * hidden if checkpointing else per_response)
    recompute = response_tokens * per_response if checkpointing else 0
    outside = response_tokens * (4 * (3 * hidden + 1) + 8 * body_sizes(config)[3] // config.num_attention_heads)
    mask = n_seqs * response_len * (prompt_len + response_len) * elem
    return prompt + body + recompute + outside + mask


def memory_plan(config, args, free_bytes, device, dtype, checkpointing, n_params=None, prompt_tokens=None,
                expands_kv=None, advise=True) -> dict:
    """Bytes per part of a run of `args` on `config`. Phases do not overlap: sampling (KV cache and a decode step's
    transients) and the loss (activations) each come on top of the training state and the sampling copy.
    `--gen-batch-size 0` resolves to the most whole groups whose sampling phase fits `free_bytes` less the MARGIN
    (all of them when free_bytes is None). device, dtype, checkpointing: as dsrl.py resolved them for the run.
    prompt_tokens: the longest prompt of the data, when known (default: --max-prompt-tokens).
    expands_kv: whether a decode step expands keys and values (default: decode_expands_kv on this transformers)."""
    n_params = n_params or count_parameters(config)
    elem, group, vocab = torch.tensor([], dtype=dtype).element_size(), args.group_size, config.vocab_size
    # The longest prompt the run can meet: the dataset's longest after the chat template, when the caller has
    # measured it, else the cap (MATH's longest prompts, 1,686 tokens with Qwen3's template, exceed the default 1,024).
    prompt_len = min(prompt_tokens or args.max_prompt_tokens, args.max_prompt_tokens)
    low_precision_copy = 2 * n_params if elem == 2 else 0  # the sampler's bf16 copy; fp32 samples from the model
    expands = decode_expands_kv(getattr(args, "kv_cache", "dynamic")) if expands_kv is None else expands_kv

    def sampling(n_seqs):
        return (kv_cache_bytes(config, n_seqs, prompt_len + args.max_new_tokens, elem)
                + decode_step_bytes(config, n_seqs, prompt_len + args.max_new_tokens, elem, expands))

    def loss(n_seqs, ckpt):  # the larger of two moments of the P(y|x) backward; + autocast's bf16 weight copies
        n_prompts, head = min(n_seqs, math.ceil(n_seqs / group) + 1), vocab * config.hidden_size
        start = (activation_bytes(config, n_seqs, n_prompts, prompt_len, args.max_new_tokens, elem, ckpt)
                 + CHUNK_COPIES * args.logprob_chunk * vocab * 4
                 + (4 + elem) * head)  # a chunk's output-weight gradient and its fp32 copy on the way into .grad
        # After the response pass's backward, every weight's gradient waits in autograd's buffers for the prompt
        # pass's backward (it runs last); with checkpointing this moment is the peak (bench/plan_vs_measured.py).
        layer = layer_bytes_per_token(config, elem, 1)
        end = (n_prompts * prompt_len * config.num_hidden_layers * layer + elem * n_params + 4 * head
               + n_seqs * args.max_new_tokens * layer)
        return max(start, end) + low_precision_copy

    state = 16 * n_params  # fp32 weights, gradients, AdamW exp_avg and exp_avg_sq
    base = state + low_precision_copy
    groups = _sampling_groups(args, lambda g: base + sampling(g * group), free_bytes)
    micro = min(args.micro_batch_size, args.prompts_per_step * group)
    plan = {"n_params": n_params, "dtype": str(dtype).replace("torch.", ""), "checkpointing": checkpointing,
            "prompt_tokens": prompt_len, "training_state": state, "sampling_copy": low_precision_copy,
            "gen_batch_size": groups * group, "kv_cache": sampling(groups * group), "micro_batch_size": micro,
            "activations": loss(micro, checkpointing), "activations_other": loss(micro, not checkpointing),
            "free_bytes": free_bytes, "device": str(device), "expands_kv": expands}
    plan["peak"] = base + max(plan["kv_cache"], plan["activations"])
    plan["fits"] = free_bytes is None or plan["peak"] <= free_bytes
    if not plan["fits"] and advise:
        resolved = dict(device=device, dtype=dtype, n_params=n_params, prompt_tokens=prompt_len, expands_kv=expands)
        plan["suggestion"], plan["advice"] = _fitting_flags(config, args, free_bytes, checkpointing, base, resolved)
    return plan


def decode_expands_kv(kv_cache="dynamic", version=None) -> bool:
    """Whether a decode step of `generate` copies every layer's keys and values to all query heads (repeat_kv):
    on transformers before 5.23 with a padding mask (a batch of prompts of unequal length), and on every version
    under torch.compile (--kv-cache compile, and static, which generate compiles on a GPU). Each copy lives for one
    layer: decode_step_bytes counts it."""
    import transformers
    major_minor = tuple(int(n) for n in re.findall(r"\d+", version or transformers.__version__)[:2])
    return major_minor < GQA_DECODE_FROM or kv_cache != "dynamic"


def decode_step_bytes(config, n_seqs, n_tokens, elem, expands):
    """The transients of one decode step of n_seqs sequences at n_tokens: generate's fp32 logits and their copies,
    and where the version expands them one layer's keys and values for every query head."""
    _, _, _, q, kv, _, _, vocab = body_sizes(config)
    expanded = 2 * n_seqs * n_tokens * q * elem if expands and q > kv else 0
    return n_seqs * vocab * 4 * SAMPLER_LOGIT_COPIES + expanded


def _sampling_groups(args, sampling_peak, free_bytes) -> int:
    """Groups per generate call: --gen-batch-size in whole groups as given, or (0 = auto) the most that fit in
    free_bytes less the MARGIN."""
    if args.gen_batch_size:
        return min(max(1, args.gen_batch_size // args.group_size), args.prompts_per_step)
    if free_bytes is None:  # no limit known: all at once
        return args.prompts_per_step
    usable = free_bytes * (1 - MARGIN)
    return max([g for g in range(1, args.prompts_per_step + 1) if sampling_peak(g) <= usable], default=1)


def _fitting_flags(config, args, free_bytes, checkpointing, base, resolved):
    """The least change to the run whose own plan fits free_bytes less the MARGIN, tried in this order: the auto
    sampling batch, checkpointing, smaller micro-batches, shorter prompts (--max-prompt-tokens cuts the longest from
    the left), shorter responses. -> (flags, advice); flags is None when nothing fits, and advice then gives the
    numbers and what would fit (a smaller model, a larger card)."""
    usable, gib = free_bytes * (1 - MARGIN), lambda b: f"{b / GiB:.1f} GiB"  # noqa: E731
    P, T, micro = resolved["prompt_tokens"], args.max_new_tokens, args.micro_batch_size

    def flags(m, ckpt, p, t):
        return " ".join(["--gen-batch-size 0"] * (args.gen_batch_size != 0) + [f"--micro-batch-size {m}"] * (m < micro)
                        + ["--gradient-checkpointing"] * (ckpt and not checkpointing)
                        + [f"--max-prompt-tokens {p}"] * (p < P) + [f"--max-new-tokens {t}"] * (t < T))
    lengths = [(p, T) for p in (P, 3 * P // 4, P // 2)] + [(P // 2, t) for t in (3 * T // 4, T // 2, T // 4)]
    for p, t in dict.fromkeys((p, t) for p, t in lengths if min(p, t) >= 1):
        for m in range(micro, 0, -1):
            for ckpt in dict.fromkeys((checkpointing, True)):
                trial = replace(args, gen_batch_size=0, micro_batch_size=m, gradient_checkpointing=ckpt,
                                max_prompt_tokens=p, max_new_tokens=t)
                plan = memory_plan(config, trial, free_bytes, checkpointing=ckpt, advise=False, **resolved)
                if plan["peak"] <= usable:  # else the last, smallest, trial's peak is reported below
                    return flags(m, ckpt, p, t), f"use {flags(m, ckpt, p, t)} (planned peak {gib(plan['peak'])})"
    card, usable_words = _card_that_fits(config, args, resolved), f"{gib(usable)} usable ({gib(free_bytes)} less 10 %)"
    if base > usable:
        per_param = base / resolved["n_params"]
        return None, (f"no flag fits: the training state and sampling copy alone take {gib(base)} ({per_param:.0f} "
                      f"bytes a parameter), more than the {usable_words}; use a model well under "
                      f"{usable / per_param / 1e9:.2f} B parameters, or {card}")
    return None, (f"no flag fits: even {flags(m, ckpt, p, t)} needs {gib(plan['peak'])}, more than the {usable_words}; "
                  f"use a smaller model, or {card}")


def _card_that_fits(config, args, resolved):
    """The smallest common GPU on which these flags fit (bf16, checkpointing, auto sampling batch) -> words."""
    for gb in CARDS_GB + (141,):
        free = int(gb * 1e9) - CUDA_CONTEXT
        plan = memory_plan(config, replace(args, gen_batch_size=0), free, "cuda", torch.bfloat16, True,
                           resolved["n_params"], resolved["prompt_tokens"], resolved["expands_kv"], advise=False)
        if plan["peak"] <= free * (1 - MARGIN):
            return f"a GPU of {gb} GB (planned peak {plan['peak'] / GiB:.1f} GiB there)"
    return "more than one GPU: the official launch (python dsrl.py --print-verl-command)"


def format_plan(plan, model_name="", device_name=None) -> str:
    """A few lines for the console: the device and dtype, each part in GiB, the peak, and the free memory (GPU) or
    available RAM (CPU) it is compared with; when it does not fit, what to change."""
    gib = lambda b: f"{b / GiB:6.1f} GiB"  # noqa: E731
    ckpt = "on" if plan["checkpointing"] else "off"
    other = f"{'without' if plan['checkpointing'] else 'with'} checkpointing {plan['activations_other'] / GiB:.1f} GiB"
    expands = "; decode expands keys and values to every head" if plan.get("expands_kv") else ""
    lines = [f"memory plan on {device_name or plan['device']}: {model_name} {count_text(plan['n_params'])} parameters, "
             f"compute {plan['dtype']}, gradient checkpointing {ckpt}, prompts of up to {plan['prompt_tokens']} "
             f"tokens{expands}",
             f"  training state   {gib(plan['training_state'])}  fp32 weights, gradients, AdamW moments",
             f"  sampling copy    {gib(plan['sampling_copy'])}  bf16 copy of the weights for generate (none in fp32)",
             f"  KV cache         {gib(plan['kv_cache'])}  sampler, --gen-batch-size {plan['gen_batch_size']}",
             f"  loss activations {gib(plan['activations'])}  --micro-batch-size {plan['micro_batch_size']} ({other})",
             f"  peak             {gib(plan['peak'])}"]
    if plan["free_bytes"] is not None:
        where = "GiB free" if plan["device"].startswith("cuda") else "GiB of RAM available"
        lines[-1] += f"  of {plan['free_bytes'] / GiB:.1f} {where}: " + ("fits" if plan["fits"] else "does NOT fit")
    if plan.get("advice"):
        lines.append(f"  to fit: {plan['advice']}")
    return "\n".join(lines)


CARDS_GB = (16, 24, 40, 80)  # the single GPUs users have: T4/V100-16, RTX 3090/4090/A10G/L4, A100-40, A100/H100-80
CUDA_CONTEXT = GiB  # what the CUDA context and the allocator keep of a card before the run allocates anything


def count_text(n) -> str:
    """596049920 -> '596 M', 4022468096 -> '4.02 B', 120576 -> '121 K': the unit that fits, three digits."""
    x, unit = next((n / 10 ** e, u) for e, u in ((9, "B"), (6, "M"), (3, "K"), (0, "")) if n >= 10 ** e or not e)
    return f"{x:.0f} {unit}".rstrip() if x >= 100 else f"{x:.3g} {unit}".rstrip()


def format_cards(config, args) -> str:
    """--plan on a machine without a GPU: the same flags on one GPU of each common size (bf16 compute,
    checkpointing as the flag says, on by default there). The answer to "will it fit my card?" before renting one."""
    ckpt = args.gradient_checkpointing is not False
    lines = [f"on one GPU with bf16 (gradient checkpointing {'on' if ckpt else 'off'}; free = card - 1 GiB):"]
    for gb in CARDS_GB:
        free = int(gb * 1e9) - CUDA_CONTEXT
        plan = memory_plan(config, args, free, "cuda", torch.bfloat16, ckpt)
        verdict = (f"fits, peak {plan['peak'] / GiB:.1f} GiB, --gen-batch-size {plan['gen_batch_size']}" if plan["fits"]
                   else f"does NOT fit; {plan['advice']}")
        lines.append(f"  {gb:3d} GB card: {verdict}")
    return "\n".join(lines)


def flags_after_out_of_memory(config, args, gen_batch_size, phase, device, dtype, checkpointing):
    """Resume flags for a run that ran out of memory in `phase` ("sampling" or "loss") although its plan fitted. The
    plan missed by an unknown amount, so the failed phase gets the largest setting it plans at <= 3/4 of the failed
    one, as explicit flags (auto sizing would choose the same batch again). -> flags, or None if none is smaller."""
    def planned(checkpointing=checkpointing, **change):  # the failed phase's planned bytes with these flags changed
        changed = replace(args, **{"gen_batch_size": gen_batch_size, **change})
        return memory_plan(config, changed, None, device, dtype, checkpointing)[
            "kv_cache" if phase == "sampling" else "activations"]
    limit, group = 0.75 * planned(), args.group_size
    if phase == "sampling":
        fit = [g for g in range(group, gen_batch_size, group) if planned(gen_batch_size=g) <= limit]
        return f"--gen-batch-size {fit[-1]}" if fit else None
    for m in range(args.micro_batch_size, 0, -1):
        for ckpt in dict.fromkeys((checkpointing, True)):
            if planned(ckpt, micro_batch_size=m) <= limit:
                return f"--micro-batch-size {m}" + " --gradient-checkpointing" * (ckpt and not checkpointing)
    return None


def free_device_memory(device):
    """Free bytes on a CUDA device now; on CPU the RAM available (Linux's MemAvailable), None where unknown."""
    if str(device).startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def plan_run(args, model_name, device, dtype, checkpointing):
    """Print the plan of this run. --plan: then exit 0, like --help. A run that cannot fit raises a ValueError with
    one line naming flags that fit, before any data or weights are loaded. -> the plan"""
    if not hub_reachable(model_name, *([] if args.plan else [args.dataset])):  # --plan reads the model's config only
        raise ValueError(NO_HUB)
    config = model_config(model_name)
    if config is None:
        raise ValueError(f"model path not found or without a config.json: {model_name} (give a model directory "
                         "or a hub id)")
    try:
        plan = memory_plan(config, args, free_device_memory(device), device, dtype, checkpointing)
    except AttributeError as e:  # a config without the decoder sizes the formulas read (not Qwen/Llama-like)
        if args.plan:
            raise ValueError(f"no memory plan for {model_name}: its config has no {e.name} "
                             "(a Qwen/Llama-style decoder config is needed)")
        return {"gen_batch_size": args.gen_batch_size or args.prompts_per_step * args.group_size}
    cuda = str(device).startswith("cuda")
    name = f"{device} ({torch.cuda.get_device_name(torch.device(device))})" if cuda else f"{device} (this machine)"
    print(format_plan(plan, model_name, name))  # stdout, with the step lines: stderr keeps the one-line errors
    if args.plan:
        if not cuda:
            print(format_cards(config, args))
        sys.exit(0)
    if not plan["fits"]:
        fix = f"use {plan['suggestion']}" if plan["suggestion"] else plan["advice"]
        raise ValueError(f"this run does not fit: needs {plan['peak'] / GiB:.1f} GiB, "
                         f"{plan['free_bytes'] / GiB:.1f} GiB free on {device}; {fix} (see python dsrl.py --plan)")
    return plan


# ---- Beyond one GPU: the official multi-GPU launch (verl) --------------------------------------------------
# The official launch scripts (run_code/DSRL_qwen3-4b.sh, DSRL_abla_qwen3-4b.sh, Baseline_qwen3-4b.sh) call
# `python3 -m verl.trainer.main_ppo` with Hydra overrides over the fork's verl/trainer/config/ppo_trainer.yaml.
# Keys are full paths (Hydra rejects others); a key the yaml lacks needs a leading "+". Behaviour checked in the
# fork's source: ray_trainer.py (_create_dataloader: drop_last, total_training_steps over total_epochs; fit: the
# P(y) switch, test_freq_early/late/threshold), dp_actor.py (update_policy), main_ppo.py (data.get("seed", 1)).
ACTOR, ROLLOUT, REF = "actor_rollout_ref.actor.", "actor_rollout_ref.rollout.", "actor_rollout_ref.ref."
# ours -> official key(s). README's table "From one GPU to the official launch" is this mapping.
VERL_KEYS = {"model": ["actor_rollout_ref.model.path"], "dataset": ["data.train_files"],
             "eval_benchmarks": ["data.val_files"],
             "prompts_per_step": ["data.train_batch_size", ACTOR + "ppo_mini_batch_size"],  # one update per step
             "group_size": [ROLLOUT + "n"], "max_prompt_tokens": ["data.max_prompt_length"],
             "max_new_tokens": ["data.max_response_length", ROLLOUT + "max_num_batched_tokens"],
             "temperature": [ROLLOUT + "temperature", ROLLOUT + "val_kwargs.temperature"],
             "top_p": [ROLLOUT + "top_p", ROLLOUT + "val_kwargs.top_p"],
             "lr": [ACTOR + "optim.lr"], "weight_decay": [ACTOR + "optim.weight_decay"],
             "clip_low": [ACTOR + "clip_ratio_low"], "clip_high": [ACTOR + "clip_ratio_high"],
             "clip_dual": [ACTOR + "clip_ratio_c"], "grad_clip": [ACTOR + "grad_clip"],
             "prerl_coef": ["algorithm.pretrain_loss_coef"], "warmup_steps": ["algorithm.pretrain_loss_disable_step"],
             "mode": [ACTOR + "negative_pretrain", ACTOR + "positive_pretrain", ACTOR + "negative_rl",
                      ACTOR + "positive_rl", "algorithm.pretrain_only_warmup", "algorithm.pretrain_only"],
             "steps": ["trainer.total_training_steps", "trainer.total_epochs"],
             "save_every": ["trainer.save_freq"], "save_total_limit": ["trainer.max_actor_ckpt_to_keep"],
             "eval_every": ["trainer.test_freq", "trainer.test_freq_early", "trainer.test_freq_late"],
             "eval_k": [ROLLOUT + "val_kwargs.n"], "eval_before_train": ["trainer.val_before_train"],
             "seed": ["+data.seed"],  # read by verl's sampler with data.get("seed", 1), absent from the yaml
             "output_dir": ["trainer.default_local_dir", "trainer.validation_data_dir", "trainer.experiment_name"],
             "report_to": ["trainer.logger"]}
# The official scripts' settings that none of our flags changes: speed, memory, GPUs, validation sampling.
TOKENS_PER_GPU = 10240  # dynamic micro-batches: at most this many tokens per GPU per forward (official 1024 * 10)
VERL_FIXED = {"algorithm.adv_estimator": "grpo", "algorithm.norm_adv_by_std_in_grpo": True,
              "algorithm.use_kl_in_reward": False, "algorithm.kl_ctrl.kl_coef": 0.0, "data.prompt_key": "prompt",
              "data.truncation": "left", "data.val_batch_size": 256, "data.prompt_template_type": "qwen3_no_thinking",
              ACTOR + "use_kl_loss": False, ACTOR + "kl_loss_coef": 0.0, ACTOR + "loss_agg_mode": "token-mean",
              ACTOR + "entropy_coeff": 0, ACTOR + "ulysses_sequence_parallel_size": 1,
              ACTOR + "fsdp_config.fsdp_size": -1, ACTOR + "fsdp_config.param_offload": True,
              ACTOR + "fsdp_config.optimizer_offload": True, ACTOR + "use_dynamic_bsz": True,
              "actor_rollout_ref.model.use_remove_padding": True,
              "actor_rollout_ref.model.enable_gradient_checkpointing": True,
              REF + "log_prob_use_dynamic_bsz": True, REF + "fsdp_config.param_offload": True,
              REF + "ulysses_sequence_parallel_size": 1, ROLLOUT + "log_prob_use_dynamic_bsz": True,
              ROLLOUT + "name": "vllm", ROLLOUT + "gpu_memory_utilization": 0.6,
              ROLLOUT + "tensor_model_parallel_size": 2, ROLLOUT + "enable_chunked_prefill": True,
              ROLLOUT + "val_kwargs.do_sample": True,  # validation samples (verl's default: greedy), as the paper
              "trainer.n_gpus_per_node": 8, "trainer.nnodes": 1, "trainer.test_freq_threshold": 100,
              "trainer.project_name": "DSRL", "trainer.resume_mode": "auto"}
# Settings of the P(y) loss: the official baseline script (grpo) leaves them at the yaml's defaults.
PY_FIXED = {"algorithm.pretrain_norm_adv_by_std": False, ACTOR + "pretrain_loss_agg_mode": "token-mean"}
OFFICIAL_FILES = {"aime24": "data/aime_2024_20times.parquet", "aime25": "data/aime_2025_20times.parquet",
                  "amc23": "data/amc2023_20times.parquet"}  # the fork's data/: each problem 20 times
MATH_ROWS = 7500  # MATH train; the fork's data/math_train.parquet holds the same 7,500 problems
NOT_IN_VERL = {  # our flags without an official counterpart, and why
    "micro_batch_size": "verl splits micro-batches by tokens instead (ppo_max_token_len_per_gpu)",
    "gen_batch_size": "vLLM schedules the rollout itself (max_num_batched_tokens)",
    "kv_cache": "vLLM manages its own KV cache (gpu_memory_utilization)",
    "logprob_chunk": "verl computes log-probs without chunking the vocabulary",
    "reward": "verl always scores with the official string scorer (our --reward official)",
    "resume": "trainer.resume_mode=auto continues from the latest checkpoint in default_local_dir",
    "max_bad_steps": "verl skips an update with a non-finite gradient norm and goes on",
    "device": "8 GPUs per node (trainer.n_gpus_per_node)", "dtype": "verl: bf16 autocast over fp32 FSDP weights",
    "deterministic": "vLLM sampling is not bit-reproducible",
    "gradient_checkpointing": "the official launch always checkpoints (model.enable_gradient_checkpointing=True)"}


def train_rows(a, default_dataset):
    """-> (rows of --dataset as verl reads them, or None when assumed, file name for data.train_files)."""
    if a.dataset == default_dataset:  # the hub copy of MATH; verl reads the fork's parquet file of it
        return None, "data/math_train.parquet"
    if not os.path.isfile(a.dataset):  # often printed on one machine for another: never open what is not here
        return None, a.dataset
    try:
        if a.dataset.endswith(".parquet"):
            import pyarrow.parquet as pq  # comes with datasets; only .parquet files need it
            return pq.ParquetFile(a.dataset).metadata.num_rows, a.dataset
    except Exception as e:
        raise ValueError(f"cannot read dataset file {a.dataset}: {type(e).__name__} (is it a valid parquet file?)")
    return len(read_rows(a.dataset)), a.dataset  # .jsonl/.json/.csv: the rows, not the lines


def val_files(a) -> list:
    """--eval-benchmarks as files the fork reads: our benchmark names -> its *_20times.parquet files."""
    return [OFFICIAL_FILES.get(b, b) for b in a.eval_benchmarks.split(",") if b]


def mode_values(a, space, samples) -> dict:
    """--mode (its space and samples) and --warmup-steps -> the official sample switches and P(y) schedule
    (dp_actor.py, ray_trainer.py)."""
    dsrl_run, prerl_only = a.mode == "dsrl", space == "y" and a.mode != "dsrl"
    values = dict(zip(VERL_KEYS["mode"], [space == "y" and samples == "neg", space == "y" and samples == "pos",
                                          dsrl_run or space == "y|x" and samples != "pos",
                                          dsrl_run or space == "y|x" and samples != "neg", dsrl_run, prerl_only]))
    # The P(y) loss runs while step < pretrain_loss_disable_step (steps from 1): W warm-up updates -> W + 1.
    # P(y)-only modes: 99999 as the official ablation script (reaching the step with pretrain_only on crashes verl).
    # P(y|x)-only modes: unset, as the official scripts: no P(y) forward at all (pretrain_loss_coef is then unused).
    if dsrl_run:
        values["algorithm.pretrain_loss_disable_step"] = a.warmup_steps + 1
    elif prerl_only:
        values["algorithm.pretrain_loss_disable_step"] = max(99999, a.steps + 1)
    if a.mode != "grpo":
        values.update(PY_FIXED)
    return values


def verl_values(a, rows: int, train_file: str, space: str, samples: str) -> dict:
    """Every printed key -> value, in the order of VERL_KEYS, then the fixed settings."""
    epochs = math.ceil(a.steps / (rows // a.prompts_per_step))  # verl drops the last partial batch of an epoch
    files = val_files(a)
    freq = a.eval_every or -1
    derived = {"dataset": [train_file], "eval_benchmarks": ["[" + ",".join(files) + "]"],
               "max_new_tokens": [a.max_new_tokens, a.max_prompt_tokens + a.max_new_tokens],  # else vLLM refuses
               "steps": [a.steps, epochs], "eval_every": [freq] * 3,
               "save_total_limit": [a.save_total_limit or "null"],
               "eval_k": [1 if all(f.endswith("_20times.parquet") for f in files) else a.eval_k],
               "eval_before_train": [a.eval_before_train and a.eval_every > 0],
               "report_to": ["[" + ",".join(f'"{n}"' for n in ["console"] + a.report_to.split(",") if n) + "]"],
               "output_dir": [a.output_dir, os.path.join(a.output_dir, "validation"), os.path.basename(
                   os.path.normpath(a.output_dir))]}
    values = {}
    for name, keys in VERL_KEYS.items():
        if name == "mode":
            values.update(mode_values(a, space, samples))
        elif name != "warmup_steps":  # set with the mode
            values.update(zip(keys, derived.get(name, [getattr(a, name)] * len(keys))))
    token_limit = max(TOKENS_PER_GPU, a.max_prompt_tokens + a.max_new_tokens)  # one sequence must fit
    values.update(VERL_FIXED)
    values.update({ACTOR + "ppo_max_token_len_per_gpu": token_limit, REF + "log_prob_max_token_len_per_gpu":
                   token_limit, ROLLOUT + "log_prob_max_token_len_per_gpu": token_limit})
    return values


def verl_comments(a, rows, assumed: bool, values: dict, space: str) -> list:
    """Where the printed run differs from the official scripts or from ours: one `#` line each, with the reason."""
    notes = [f"# --{f.name.replace('_', '-')} {getattr(a, f.name)!s:.40}".rstrip() + f": no official counterpart; {why}"
             for f in fields(a) if (why := NOT_IN_VERL.get(f.name))]
    per_epoch = rows // a.prompts_per_step  # verl drops the last partial batch
    guess = " assumed: MATH train; count them where the file is" if assumed else ""
    notes.append(f"# trainer.total_training_steps={a.steps}: verl stops there; total_epochs="
                 f"{values['trainer.total_epochs']} only has to reach it ({per_epoch} steps of {a.prompts_per_step} "
                 f"prompts per epoch, {rows} rows{guess}"
                 "). The official scripts give total_epochs=6 alone: 348 steps on MATH at 128 prompts")
    if values["trainer.test_freq"] > 0:
        notes.append(f"# trainer.test_freq_late={a.eval_every}: ours evaluates every {a.eval_every} steps throughout; "
                     "the official scripts switch to every 25 after step 100 (test_freq_late=25)")
    if values[ROLLOUT + "val_kwargs.n"] == 1:
        notes.append(f"# {ROLLOUT}val_kwargs.n=1: the *_20times files repeat each problem 20 times, so each is "
                     f"sampled 20 times (Avg@20); our --eval-k {a.eval_k} samples each distinct problem "
                     f"{a.eval_k} times")
    if a.mode == "dsrl":
        notes.append("# --warmup-space y: the warm-up in P(y), as officially (pretrain_only_warmup=True); "
                     "--warmup-space 'y|x' prints the NSR-RL warm-up's two launches")
    if space == "y|x":
        notes.append(f"# --warmup-steps {a.warmup_steps}: unused by {a.mode}; algorithm.pretrain_loss_disable_step "
                     "unset as in the official scripts (no P(y) loss)")
    notes.append(f"# +data.seed={a.seed}: verl's data-order seed (unset in the official scripts: 1); verl's order "
                 "differs from ours for the same seed")
    keep = values["trainer.max_actor_ckpt_to_keep"]
    notes.append(f"# trainer.max_actor_ckpt_to_keep={keep}: from --save-total-limit (the official scripts: null, all)")
    notes.append("# trainer.logger, trainer.resume_mode: from --report-to (the official scripts: console and wandb); "
                 "the official scripts never resume")
    if not all(f.endswith(".parquet") and os.path.isfile(f) for f in [values["data.train_files"]] + val_files(a)):
        notes.append("# data.train_files, data.val_files: verl parquet files where the command runs (the fork's "
                     "data/ holds math_train.parquet and the *_20times.parquet validation files)")
    return notes


def verl_command(a, modes: dict, default_dataset: str) -> str:
    """The official launch of the run of settings `a` (dsrl.Args), given dsrl's mode table (mode -> (space, samples))
    and default dataset: comments first, then `python3 -m verl.trainer.main_ppo k=v ...`."""
    space, samples = modes[a.mode]
    if a.mode == "dsrl" and a.warmup_space == "y|x" and a.warmup_steps > 0:
        return policy_space_warmup_launches(a, modes, default_dataset)
    rows, train_file = train_rows(a, default_dataset)
    assumed = rows is None
    rows = MATH_ROWS if assumed else rows
    if rows < a.prompts_per_step:
        raise ValueError(f"--prompts-per-step {a.prompts_per_step} exceeds the {rows} rows of {a.dataset}: "
                         "verl drops the last partial batch, so it would have no batch at all; "
                         "use fewer prompts per step")
    values = verl_values(a, rows, train_file, space, samples)
    lines = ["python3 -m verl.trainer.main_ppo"] + [f"{k}={shlex.quote(str(v))}" for k, v in values.items()]
    return "\n".join(verl_comments(a, rows, assumed, values, space) + [" \\\n    ".join(lines)])


def policy_space_warmup_launches(a, modes: dict, default_dataset: str) -> str:
    """--warmup-space 'y|x' (NSR-RL warm-up, then GRPO) as two launches: the fork fixes positive_rl / negative_rl
    for a whole run (dp_actor.py, update_policy), so no key switches them at step W + 1. The second launch resumes
    from the first's checkpoint at step W (weights, AdamW state, data position: ray_trainer.py, _load_checkpoint)."""
    w = a.warmup_steps
    warm = replace(a, mode="nsr-rl", warmup_space="y", steps=w, save_every=w)
    rl = replace(a, mode="grpo", warmup_space="y")
    drop = lambda text: "\n".join(line for line in text.splitlines() if not line.startswith("# --warmup-steps"))
    return "\n".join([
        f"# --warmup-space y|x: the official code cannot switch the RL loss's samples during a run (positive_rl and "
        f"negative_rl are fixed), so this is two launches in the same trainer.default_local_dir. 1: NSR-RL for the "
        f"{w} warm-up steps, saved at step {w}:", drop(verl_command(warm, modes, default_dataset)),
        f"# 2: GRPO to step {a.steps}; trainer.resume_mode=auto resumes from global_step_{w} of launch 1 (weights, "
        "AdamW state, step and data position carry on, as in our hand-over):",
        drop(verl_command(rl, modes, default_dataset))])
