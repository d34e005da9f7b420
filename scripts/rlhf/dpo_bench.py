"""PyTorch reference for `cargo xtask bench dpo_train_step` (and `dpo_step_memory`).

One DPO step on GPT-2 small (random init, dropout off): the frozen reference's forward under
no_grad, the policy's forward, sigmoid DPO loss on the completion log-probs (log_softmax over
the vocabulary, gathered at the labels, as TRL does without its fused LM head), backward and
AdamW. `--pairs 2 --seq 256` (64 prompt + 192 completion tokens) is the throughput benchmark;
`--pairs 4 --seq 512 --memory` reports the peak resident memory of one step.

    pip install torch transformers
    python3 scripts/rlhf/dpo_bench.py --threads 2            # {"bench": "dpo_train_step", ...}
    python3 scripts/rlhf/dpo_bench.py --pairs 4 --seq 512 --memory
Run it in the same sitting as `cargo xtask bench dpo_train_step --threads 2`.
"""
import argparse
import copy
import json
import resource
import time

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

p = argparse.ArgumentParser()
p.add_argument("--threads", type=int, default=2)
p.add_argument("--pairs", type=int, default=2)
p.add_argument("--seq", type=int, default=256)
p.add_argument("--prompt", type=int, default=None)
p.add_argument("--steps", type=int, default=3)
p.add_argument("--memory", action="store_true")
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
prompt = a.prompt if a.prompt is not None else a.seq // 4

cfg = GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
policy = GPT2LMHeadModel(cfg).train()
reference = copy.deepcopy(policy).eval()
for q in reference.parameters():
    q.requires_grad_(False)
opt = torch.optim.AdamW(policy.parameters(), lr=1e-6, weight_decay=0.0)

b = a.pairs
ids = torch.randint(0, cfg.vocab_size, (2 * b, a.seq))  # chosen rows, then rejected rows
ids[b:, :prompt] = ids[:b, :prompt]  # shared prompts
mask = torch.zeros_like(ids)
mask[:, prompt:] = 1


def seq_logps(model):
    logits = model(input_ids=ids).logits[:, :-1]
    lp = F.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (lp * mask[:, 1:]).sum(1)


def step():
    with torch.no_grad():
        ref = seq_logps(reference)
    pol = seq_logps(policy)
    delta = (pol[:b] - ref[:b]) - (pol[b:] - ref[b:])
    loss = -F.logsigmoid(0.1 * delta).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


if a.memory:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.time()
    step()
    dt = time.time() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"bench": "dpo_step_memory", "framework": "torch", "threads": a.threads,
                      "pairs": b, "seq": a.seq, "baseline_mib": round(base / 1024),
                      "peak_mib": round(peak / 1024), "step_s": round(dt, 2)}))
else:
    step()
    t = time.time()
    for _ in range(a.steps):
        step()
    dt = time.time() - t
    print(json.dumps({"bench": "dpo_train_step", "framework": "torch", "threads": a.threads,
                      "pairs": b, "seq": a.seq, "steps": a.steps,
                      "pairs_per_s": round(b * a.steps / dt, 3),
                      "ms_per_step": round(1000 * dt / a.steps)}))
