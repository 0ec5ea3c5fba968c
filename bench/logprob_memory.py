"""Peak extra memory of the log-prob + loss pass (forward AND backward) versus response length T, CPU.

    python bench/logprob_memory.py                      # T = 256 .. 4096, dsrl chunk 256 (default) and 1024
    python bench/logprob_memory.py --T 256,1024 --chunk 512

Model: Qwen3 with the REAL vocabulary (151,936) but a tiny body (hidden 64, 1 layer), so the vocabulary
projection dominates, which is exactly what dsrl's chunked log-prob is about. Three methods per T:
  dsrl   dsrl.logprob_y_given_x(..., chunk=C) + backward   (chunked, checkpointed vocab projection), one
         column per C of --chunk (a comma list)
  naive  body -> lm_head on all (N, T) positions -> log_softmax (N, T, V) -> gather, + backward
  body   body only, loss = hidden.sum(), + backward     (what any method pays; no vocab projection)

Honest peak measurement: every (method, T) point runs in a FRESH subprocess. After building the model and
the inputs, the child resets the kernel's peak-RSS counter (`echo 5 > /proc/self/clear_refs`, Linux) so
VmHWM = current RSS, runs one pass, and reports VmHWM - VmRSS_before. (torch has no CPU
max_memory_allocated; if clear_refs is unavailable we fall back to ru_maxrss minus the RSS before.)
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
VOCAB = 151_936  # Qwen3


def proc_status_kb(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def child(method, T, chunk, n_seq, prompt_len):
    import torch
    sys.path.insert(0, REPO)
    import dsrl
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    model = Qwen3ForCausalLM(cfg)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (prompt_len,), generator=g).tolist() for _ in range(n_seq)]
    responses = [torch.randint(3, VOCAB, (T,), generator=g).tolist() for _ in range(n_seq)]
    pad = 0

    def run():
        if method == "dsrl":
            logp, mask = dsrl.logprob_y_given_x(model, prompts, responses, pad, 1.0, chunk)
            loss = (logp * mask).sum() / mask.sum()
        else:
            x, x_mask = dsrl.left_pad(prompts, pad, "cpu")
            y, y_mask = dsrl.right_pad(responses, pad, "cpu")
            ids, mask = torch.cat([x, y], 1), torch.cat([x_mask, y_mask.long()], 1)
            hidden = model.base_model(input_ids=ids, attention_mask=mask,
                                      position_ids=dsrl.positions_from_mask(mask)).last_hidden_state
            P = x.shape[1]
            if method == "body":
                loss = hidden.sum()
            else:  # naive: the full (N, T, V) log-softmax
                logits = model.lm_head(hidden[:, P - 1:P - 1 + T]).float()  # (N, T, V)
                logp = logits.log_softmax(-1).gather(-1, y[..., None]).squeeze(-1)  # (N, T)
                loss = (logp * y_mask).sum() / y_mask.sum()
        loss.backward()
        model.zero_grad(set_to_none=False)  # keep .grad buffers: they are part of the steady state

    run()  # warm-up pass: allocates the parameter .grad buffers, so they count in the baseline
    rss_before = proc_status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    t0 = time.time()
    run()
    secs = time.time() - t0
    peak_kb = proc_status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"method": method, "T": T, "extra_mb": (peak_kb - rss_before) / 1024, "secs": secs,
                      "hwm_reset": reset}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", default="256,512,1024,2048,4096", help="response lengths")
    ap.add_argument("--chunk", default="256,1024",
                    help="dsrl logprob_chunk values (comma list; 256 is dsrl's default), one dsrl column each")
    ap.add_argument("--n-seq", type=int, default=1, help="sequences in the batch (naive needs N*T*V*4 bytes per copy)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--methods", default="body,dsrl,naive")
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "T"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child[0], int(a.child[1]), int(a.chunk), a.n_seq, a.prompt_len)
    Ts = [int(t) for t in a.T.split(",")]
    chunks = [int(c) for c in a.chunk.split(",")]
    # one column per (method, chunk); only dsrl depends on the chunk
    methods = []
    for m in a.methods.split(","):
        methods += [f"dsrl@{c}" for c in chunks] if m == "dsrl" else [m]
    res = {}
    for T in Ts:
        for m in methods:
            meth, _, c = m.partition("@")
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", meth, str(T),
                                  "--chunk", c or str(chunks[0]),
                                  "--n-seq", str(a.n_seq), "--prompt-len", str(a.prompt_len)],
                                 capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if out.returncode != 0:
                print(out.stderr[-2000:], file=sys.stderr)
                res[m, T] = None
                continue
            res[m, T] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  {m:9s} T={T:5d}: +{res[m, T]['extra_mb']:8.1f} MB  {res[m, T]['secs']:.2f}s", file=sys.stderr)
    V = VOCAB
    print(f"\nPeak extra RSS (MB) of one log-prob + loss forward+backward, CPU fp32, N={a.n_seq}, "
          f"vocab {V}, hidden 64, 1 layer, dsrl@C = dsrl with logprob chunk C")
    print(f"{'T':>6} | " + " | ".join(f"{m + ' MB':>12}" for m in methods) + f" | {'N*T*V*4 MB':>10}")
    for T in Ts:
        cells = [f"{res[m, T]['extra_mb']:12.1f}" if res.get((m, T)) else f"{'failed':>12}" for m in methods]
        print(f"{T:6d} | " + " | ".join(cells) + f" | {a.n_seq * T * V * 4 / 2**20:10.1f}")


if __name__ == "__main__":
    main()
