"""scale.py - where a run fits: one GPU's memory plan, then the launch beyond one GPU.

It holds two things that are not the method (dsrl.py is), but decide where the method can run:
 1. The memory plan for one GPU: what a run of dsrl.py needs, and which flags make it fit.
 2. Beyond one GPU: the official multi-GPU launch (the verl fork, 8 GPUs, vLLM) of the same experiment.
    `python dsrl.py --print-verl-command ...` prints it; README.md, "From one GPU to the official launch".

dsrl.py imports this module only inside main(), so training never depends on it.
"""

import math
import os
import shlex
from dataclasses import fields

import pyarrow.parquet as pq  # comes with datasets

from dsrl import DEFAULT_DATASET, MODES, Args, UsageError

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
             "output_dir": ["trainer.default_local_dir", "trainer.validation_data_dir", "trainer.experiment_name"]}
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
              "trainer.project_name": "DSRL", "trainer.logger": '["console"]', "trainer.resume_mode": "auto"}
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
    "deterministic": "vLLM sampling is not bit-reproducible"}


def train_rows(a: Args):
    """-> (rows of --dataset as verl reads them, or None when assumed, file name for data.train_files)."""
    if a.dataset == DEFAULT_DATASET:  # the hub copy of MATH; verl reads the fork's parquet file of it
        return None, "data/math_train.parquet"
    if not os.path.isfile(a.dataset):  # often printed on one machine for another: never open what is not here
        return None, a.dataset
    try:
        if a.dataset.endswith(".parquet"):
            return pq.ParquetFile(a.dataset).metadata.num_rows, a.dataset
        with open(a.dataset, encoding="utf-8") as fh:
            return sum(1 for line in fh if line.strip()), a.dataset
    except Exception as e:
        raise UsageError(f"cannot read dataset file {a.dataset}: {type(e).__name__} "
                         "(is it a valid parquet/jsonl file?)")


def val_files(a: Args) -> list:
    """--eval-benchmarks as files the fork reads: our benchmark names -> its *_20times.parquet files."""
    return [OFFICIAL_FILES.get(b, b) for b in a.eval_benchmarks.split(",") if b]


def mode_values(a: Args) -> dict:
    """--mode and --warmup-steps -> the official sample switches and P(y) schedule (dp_actor.py, ray_trainer.py)."""
    space, samples = MODES[a.mode]
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


def verl_values(a: Args, rows: int, train_file: str) -> dict:
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
               "output_dir": [a.output_dir, os.path.join(a.output_dir, "validation"), os.path.basename(
                   os.path.normpath(a.output_dir))]}
    values = {}
    for name, keys in VERL_KEYS.items():
        if name == "mode":
            values.update(mode_values(a))
        elif name != "warmup_steps":  # set with the mode
            values.update(zip(keys, derived.get(name, [getattr(a, name)] * len(keys))))
    token_limit = max(TOKENS_PER_GPU, a.max_prompt_tokens + a.max_new_tokens)  # one sequence must fit
    values.update(VERL_FIXED)
    values.update({ACTOR + "ppo_max_token_len_per_gpu": token_limit, REF + "log_prob_max_token_len_per_gpu":
                   token_limit, ROLLOUT + "log_prob_max_token_len_per_gpu": token_limit})
    return values


def verl_comments(a: Args, rows, assumed: bool, values: dict) -> list:
    """Where the printed run differs from the official scripts or from ours: one `#` line each, with the reason."""
    notes = [f"# --{f.name.replace('_', '-')} {getattr(a, f.name)!s:.40}".rstrip() + f": no official counterpart; {why}"
             for f in fields(Args) if (why := NOT_IN_VERL.get(f.name))]
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
    if MODES[a.mode][0] == "y|x":
        notes.append(f"# --warmup-steps {a.warmup_steps}: unused by {a.mode}; algorithm.pretrain_loss_disable_step "
                     "unset as in the official scripts (no P(y) loss)")
    notes.append(f"# +data.seed={a.seed}: verl's data-order seed (unset in the official scripts: 1); verl's order "
                 "differs from ours for the same seed")
    keep = values["trainer.max_actor_ckpt_to_keep"]
    notes.append(f"# trainer.max_actor_ckpt_to_keep={keep}: from --save-total-limit (the official scripts: null, all)")
    notes.append("# trainer.logger, trainer.resume_mode: the official scripts log to wandb too and never resume; "
                 "add wandb to the logger list if you use it")
    if not all(f.endswith(".parquet") and os.path.isfile(f) for f in [values["data.train_files"]] + val_files(a)):
        notes.append("# data.train_files, data.val_files: verl parquet files where the command runs (the fork's "
                     "data/ holds math_train.parquet and the *_20times.parquet validation files)")
    return notes


def verl_command(a: Args) -> str:
    """The official launch of the same experiment: comments first, then `python3 -m verl.trainer.main_ppo k=v ...`."""
    rows, train_file = train_rows(a)
    assumed = rows is None
    rows = MATH_ROWS if assumed else rows
    if rows < a.prompts_per_step:
        raise UsageError(f"--prompts-per-step {a.prompts_per_step} exceeds the {rows} rows of {a.dataset}: verl drops "
                         "the last partial batch, so it would have no batch at all; use fewer prompts per step")
    values = verl_values(a, rows, train_file)
    lines = ["python3 -m verl.trainer.main_ppo"] + [f"{k}={shlex.quote(str(v))}" for k, v in values.items()]
    return "\n".join(verl_comments(a, rows, assumed, values) + [" \\\n    ".join(lines)])

