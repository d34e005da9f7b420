"""transformers reference for `cargo xtask bench rollout_decode`.

GPT-2 small (random init), 16 sequences x 64 new tokens after an 8-token prompt, batched
`generate` with sampling (temperature 1, top_k 0, EOS never produced: min_new_tokens = 64) and
the KV cache, as TRL's trainers call it for rollouts; prints tokens/s and the GFLOP/s it reaches
(the same FLOP count as kiln's bench: 2 x weights per token plus attention over the cache).

    pip install torch transformers
    python3 scripts/rlhf/rollout_bench.py --threads 2     # {"bench": "rollout_decode", ...}
Run it in the same sitting as `cargo xtask bench rollout_decode --threads 2`.
"""
import argparse
import json
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

p = argparse.ArgumentParser()
p.add_argument("--threads", type=int, default=2)
p.add_argument("--rows", type=int, default=16)
p.add_argument("--prompt", type=int, default=8)
p.add_argument("--new", type=int, default=64)
p.add_argument("--reps", type=int, default=3)
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)

cfg = GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
model = GPT2LMHeadModel(cfg).eval()
ids = torch.tensor([[(r * 131 + t * 17) % 50000 for t in range(a.prompt)] for r in range(a.rows)])
mask = torch.ones_like(ids)


def run(new):
    with torch.no_grad():
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=cfg.eos_token_id,
        )


def flops(rows, prompt, new):
    c, L, V, inner = cfg.n_embd, cfg.n_layer, cfg.vocab_size, 4 * cfg.n_embd
    w = L * (4 * c * c + 2 * c * inner) + c * V
    f = 0.0
    for t in range(new):
        f += 2 * w + L * 4 * c * (prompt + t)
    f += 2 * prompt * (w - c * V) + 2 * c * V
    return f * rows


run(4)
t = time.perf_counter()
tokens = 0
for _ in range(a.reps):
    out = run(a.new)
    tokens += (out.shape[1] - a.prompt) * a.rows
dt = time.perf_counter() - t
print(json.dumps({
    "bench": "rollout_decode",
    "framework": f"transformers {__import__('transformers').__version__} / torch {torch.__version__}",
    "threads": a.threads,
    "rows": a.rows,
    "new_tokens": a.new,
    "reps": a.reps,
    "tokens_per_s": round(tokens / dt, 1),
    "gflops": round(flops(a.rows, a.prompt, a.new) * a.reps / dt / 1e9, 1),
}))
