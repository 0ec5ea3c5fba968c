"""Tests for dsrl.py and eval.py: offline, CPU, a few minutes.  Run:  python -m pytest -q test_dsrl.py

Everything loads a tiny Qwen3 (2 layers, hidden 64) with a character-level ChatML tokenizer that the
fixtures build and save with `save_pretrained`, exactly as a user's checkpoint would be loaded.
The tiny model is briefly trained to answer "\\boxed{1}" or "\\boxed{2}" at random, so that groups hold
right and wrong answers and every mode has real advantages and gradients to work with.
"""
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import dsrl  # noqa: E402

SHARED_DATA = os.path.join(HERE, "..", "shared", "data")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# ----------------------------------------------------------------------------------------------------
# Fixtures: tiny tokenizer, tiny model, tiny dataset in the official verl format
# ----------------------------------------------------------------------------------------------------
def make_tokenizer(with_template=True, specials=SPECIALS):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = ["<unk>"] + [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(list(specials) + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", additional_special_tokens=list(specials),
                                  eos_token=specials[-1] if specials else None,
                                  pad_token=specials[0] if specials else None)
    if with_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(vocab_size, tok):
    from transformers import Qwen3Config
    return Qwen3Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                       tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       bos_token_id=None)


def problem_rows(n, seed=0):
    """Rows in the official verl format (as ../shared/data/math_train.parquet): gold "1" or "2"."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a = rng.randint(0, 1)
        rows.append({"data_source": "tiny", "ability": "math",
                     "prompt": [{"role": "system", "content": dsrl.SYSTEM_PROMPT},
                                {"role": "user", "content": f"What is {a}+1?"}],
                     "reward_model": {"ground_truth": str(a + 1)}, "extra_info": {"index": i, "split": "train"}})
    return rows


def make_tiny_model(path, pretrain_steps=150, seed=0):
    """Save a tiny Qwen3 + tokenizer to `path`. With pretrain_steps > 0 the model first learns to reply
    "\\boxed{1}<|im_end|>" or "\\boxed{2}<|im_end|>" (at random), so rewards are mixed 0/1."""
    from transformers import Qwen3ForCausalLM
    torch.manual_seed(seed)
    tok = make_tokenizer()
    model = Qwen3ForCausalLM(tiny_config(len(tok), tok))
    if pretrain_steps:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        rows = problem_rows(32, seed)
        for _ in range(pretrain_steps):
            seqs = []
            for r in random.Random(_).sample(rows, 16):
                prompt = dsrl.build_prompt(tok, r["prompt"], 512)
                seqs.append(prompt + tok(f"\\boxed{{{random.Random(_ * 97 + len(seqs)).choice('12')}}}<|im_end|>",
                                         add_special_tokens=False)["input_ids"])
            ids, mask = dsrl.right_pad(seqs, tok.pad_token_id, "cpu")
            labels = ids.masked_fill(~mask, -100)
            loss = model(input_ids=ids, attention_mask=mask.long(), labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_parquet(rows, path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_model")))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return write_parquet(problem_rows(64), str(tmp_path_factory.mktemp("data") / "math_tiny.parquet"))


@pytest.fixture()
def tiny(tiny_model_dir):
    model, tok = dsrl.load_model_and_tokenizer(tiny_model_dir, "cpu")
    return model, tok


def run_cli(args, timeout=600, script="dsrl.py"):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, os.path.join(HERE, script)] + [str(a) for a in args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=HERE)


def read_jsonl(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def small_args(**kw):
    base = dict(micro_batch_size=2, temperature=1.0, clip_low=0.2, clip_high=0.2, clip_dual=10.0, logprob_chunk=7,
                dtype="float32", device="cpu")
    base.update(kw)
    return dsrl.Args(**base)
