"""scale.py - where a run fits.

(1) One GPU: the memory plan. `python dsrl.py --plan [flags]` prints it and exits; every training run prints it
    before the first step. It is computed by formula from the model's config.json and the flags: nothing is
    allocated, no weights are read. It also resolves `--gen-batch-size 0` ("auto") and
    holds the gradient checkpointing of the loss passes (`--gradient-checkpointing`).
(2) Many GPUs: the official launch of the same experiment (verl).
"""

import math
import sys
from contextlib import contextmanager
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

# ---- One GPU: the memory plan -------------------------------------------------------------------------------
GiB = 2 ** 30
# The prompt length the plan assumes: MATH prompts with the chat template are ~80-300 tokens, and a batch is
# padded to its longest. The KV cache and the loss pass grow with it; --max-prompt-tokens caps it.
PLANNED_PROMPT_TOKENS = 512
SAMPLER_LOGIT_COPIES = 4  # generate's per-step fp32 logits, scores, probabilities and top-p mask: (n, vocab) each
CHUNK_COPIES = 4          # the checkpointed vocabulary chunk in backward: logits, recomputed logits, softmax, grad


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


def compute_dtype(name, device, error=ValueError):
    """--dtype: auto = bf16 on a GPU with native bf16, else fp32 (CPU, or a T4: fp32 compute works there, bf16
    would be emulated). bf16 asked of a GPU without it raises `error` with one line, before anything loads."""
    cuda = str(device).startswith("cuda")
    if name == "bfloat16" and cuda and not bf16_supported():
        raise error(f"--dtype bfloat16: {torch.cuda.get_device_name()} has no native bf16; use --dtype auto (fp32)")
    if name != "auto":
        return getattr(torch, name)
    return torch.bfloat16 if cuda and bf16_supported() else torch.float32


def bf16_supported():
    """Native bf16 on the current CUDA device (a T4 has none; emulation would be slow and is not counted)."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch without the argument
        return torch.cuda.is_bf16_supported()


def use_checkpointing(args, device) -> bool:
    """--gradient-checkpointing: on with CUDA (as the official run), off on CPU; the flag overrides either way."""
    given = getattr(args, "gradient_checkpointing", None)
    return str(device).startswith("cuda") if given is None else bool(given)


def memory_plan(config, args, free_bytes=None, device=None, dtype=None, checkpointing=None, n_params=None) -> dict:
    """Bytes per part of a run of `args` on `config`. Phases do not overlap: sampling (KV cache) and the loss
    (activations) each come on top of the training state and the sampling copy. `--gen-batch-size 0` resolves to
    the most whole groups whose sampling phase fits `free_bytes` (all of them when free_bytes is None).
    device, dtype, checkpointing: as resolved for the run (default: from args and this machine)."""
    if device is None:
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = dtype or compute_dtype(args.dtype, device)
    checkpointing = use_checkpointing(args, device) if checkpointing is None else checkpointing
    n_params = n_params or count_parameters(config)
    elem, group, vocab = torch.tensor([], dtype=dtype).element_size(), args.group_size, config.vocab_size
    prompt_len = min(PLANNED_PROMPT_TOKENS, args.max_prompt_tokens)
    low_precision_copy = 2 * n_params if elem == 2 else 0  # the sampler's bf16 copy; fp32 samples from the model

    def sampling(n_seqs):
        return (kv_cache_bytes(config, n_seqs, prompt_len + args.max_new_tokens, elem)
                + n_seqs * vocab * 4 * SAMPLER_LOGIT_COPIES)

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
            "free_bytes": free_bytes}
    plan["peak"] = base + max(plan["kv_cache"], plan["activations"])
    plan["fits"] = free_bytes is None or plan["peak"] <= free_bytes
    if not plan["fits"]:
        plan["suggestion"] = _fitting_flags(plan, base, sampling(group), loss, free_bytes)
    return plan


def _sampling_groups(args, sampling_peak, free_bytes) -> int:
    """Groups per generate call: --gen-batch-size in whole groups as given, or (0 = auto) the most that fit."""
    if args.gen_batch_size:
        return min(max(1, args.gen_batch_size // args.group_size), args.prompts_per_step)
    if free_bytes is None:  # no limit known (CPU): all at once
        return args.prompts_per_step
    return max([g for g in range(1, args.prompts_per_step + 1) if sampling_peak(g) <= free_bytes], default=1)


def _fitting_flags(plan, base, one_group, loss, free_bytes):
    """Flags of the largest setting that fits: the auto sampling batch, then checkpointing, then smaller
    micro-batches. -> str, or None when not even one group can be sampled (a smaller model is needed)."""
    if base + one_group > free_bytes:
        return None
    flags = [] if base + plan["kv_cache"] <= free_bytes else ["--gen-batch-size 0"]
    micro, checkpointing = plan["micro_batch_size"], plan["checkpointing"]
    for m in range(micro, 0, -1):
        for ckpt in dict.fromkeys((checkpointing, True)):
            if base + loss(m, ckpt) <= free_bytes:
                return " ".join(flags + [f"--micro-batch-size {m}"] * (m < micro)
                                + ["--gradient-checkpointing"] * (ckpt and not checkpointing))
    return None


def format_plan(plan, model_name="") -> str:
    """A few lines for the console: each part in GiB, the peak, and the free memory it is compared with."""
    gib = lambda b: f"{b / GiB:6.1f} GiB"  # noqa: E731
    ckpt = "on" if plan["checkpointing"] else "off"
    other = f"{'without' if plan['checkpointing'] else 'with'} checkpointing {plan['activations_other'] / GiB:.1f} GiB"
    lines = [f"memory plan: {model_name} {plan['n_params'] / 1e9:.2f} B parameters, compute {plan['dtype']}, "
             f"gradient checkpointing {ckpt}, prompts of up to {plan['prompt_tokens']} tokens assumed",
             f"  training state   {gib(plan['training_state'])}  fp32 weights, gradients, AdamW moments",
             f"  sampling copy    {gib(plan['sampling_copy'])}  bf16 copy of the weights for generate (none in fp32)",
             f"  KV cache         {gib(plan['kv_cache'])}  sampler, --gen-batch-size {plan['gen_batch_size']}",
             f"  loss activations {gib(plan['activations'])}  --micro-batch-size {plan['micro_batch_size']} ({other})",
             f"  peak             {gib(plan['peak'])}"]
    if plan["free_bytes"] is not None:
        lines[-1] += f"  of {plan['free_bytes'] / GiB:.1f} GiB free: " + ("fits" if plan["fits"] else "does NOT fit")
    return "\n".join(lines)


def free_device_memory(device):
    """Free bytes on a CUDA device now; None on CPU (memory there is rarely the limit, compute is)."""
    return torch.cuda.mem_get_info(torch.device(device))[0] if str(device).startswith("cuda") else None


def plan_run(args, model_name, device, dtype, error=ValueError):
    """Print the plan of this run. --plan: then exit 0, like --help. A run that cannot fit raises `error` with one
    line naming flags that fit, before any data or weights are loaded. -> the plan"""
    config = model_config(model_name)
    if config is None:
        raise error(f"cannot read the config.json of '{model_name}' (check the path or hub id)")
    try:
        plan = memory_plan(config, args, free_device_memory(device), device, dtype)
    except AttributeError as e:  # a config without the decoder sizes the formulas read (not Qwen/Llama-like)
        if args.plan:
            raise error(f"no memory plan for {model_name}: its config has no {e.name} (a Qwen/Llama-style decoder "
                        "config is needed)")
        return {"gen_batch_size": args.gen_batch_size or args.prompts_per_step * args.group_size}
    print(format_plan(plan, model_name), file=sys.stderr)
    if args.plan:
        sys.exit(0)
    if not plan["fits"]:
        fix = (f"use {plan['suggestion']}" if plan["suggestion"] else "even one group at --micro-batch-size 1 "
               "--gradient-checkpointing does not fit: use a smaller --model or --max-new-tokens")
        raise error(f"this run does not fit: needs {plan['peak'] / GiB:.1f} GiB, {plan['free_bytes'] / GiB:.1f} GiB "
                    f"free on {device}; {fix} (see python dsrl.py --plan)")
    return plan


# Gradient checkpointing of the loss passes (official: actor_rollout_ref.model.enable_gradient_checkpointing=True).
@contextmanager
def checkpointed_layers(model, enabled=True):
    """Within the block, every decoder layer keeps only its inputs and recomputes its activations in backward
    (torch's non-reentrant checkpoint). Hugging Face's own switch drops the KV cache, which the shared prompt
    forward needs; here the layers keep it and read it through `read_only_cache`. Never used for the sampler."""
    layers = list(model.base_model.layers) if enabled else []
    for layer in layers:  # an instance attribute shadows the class's forward for this block only
        layer.forward = partial(checkpoint, layer.forward, use_reentrant=False)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def read_only_cache(cache):
    """The prompt's KV cache, read by the response pass without being appended to: a layer recomputed under
    checkpointing then sees the same keys and values (an appending cache would hold the response's twice).
    Same numbers as DynamicCache's update: the concatenation of the prompt's and the new keys/values."""
    def update(key_states, value_states, layer_idx, *args, **kwargs):
        layer = cache.layers[layer_idx]
        return torch.cat([layer.keys, key_states], -2), torch.cat([layer.values, value_states], -2)
    cache.update = update
    return cache
