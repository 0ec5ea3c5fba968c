"""Randomly initialised models and problems for the benchmarks, built offline with torch and transformers alone.

The GPU check (gpu_check.py) runs on machines that have torch and transformers and little else: this module
imports neither pytest nor pyarrow. The tiny model has the sizes of test_dsrl.py's (2 layers, hidden 64, a
character-level ChatML tokenizer); qwen3-0.6b the real Qwen3-0.6B configuration, its tokenizer padded to the real
vocabulary. The tests check that both tiny models have the same parameters (test_gpu_check_tiny_mode_...).
"""
import json
import os
import random
import sys

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
SIZES = {"tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=False),
         "qwen3-0.6b": dict(vocab_size=151_936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                            num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                            max_position_embeddings=40960, rope_theta=1_000_000, rms_norm_eps=1e-6,
                            tie_word_embeddings=True)}


def char_tokenizer(vocab_size=None):
    """One token per character, ChatML specials first; padded with decodable filler ids to vocab_size."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    toks = SPECIALS + ["<unk>"] + [chr(c) for c in range(32, 127)] + ["\n"]
    toks += [f"<t{i}>" for i in range((vocab_size or len(toks)) - len(toks))]  # a random model samples them
    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(toks)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", additional_special_tokens=list(SPECIALS),
                                  eos_token=SPECIALS[-1], pad_token=SPECIALS[0])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def problem_rows(n, seed=0, system_prompt=""):
    """Rows in the official verl format: "What is a+1?", gold "1" or "2"."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a = rng.randint(0, 1)
        rows.append({"data_source": "tiny", "ability": "math",
                     "prompt": [{"role": "system", "content": system_prompt},
                                {"role": "user", "content": f"What is {a}+1?"}],
                     "reward_model": {"ground_truth": str(a + 1)}, "extra_info": {"index": i, "split": "train"}})
    return rows


def build(out_dir, name, seed=0):
    """A random-weight model `name` (tiny | qwen3-0.6b) and its tokenizer, saved to out_dir."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM
    sizes = dict(SIZES[name])
    tok = char_tokenizer(sizes.get("vocab_size"))
    sizes.setdefault("vocab_size", len(tok))
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**sizes, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                        bos_token_id=None))
    print(f"built a random {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters", file=sys.stderr)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def write_rows(path, n, system_prompt):
    with open(path, "w") as fh:
        json.dump(problem_rows(n, 0, system_prompt), fh)
    return os.path.getsize(path)
