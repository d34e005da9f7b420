"""PyTorch side of the `fid_inception_features` benchmark: pytorch-fid's FID
InceptionV3 (random weights: speed does not depend on them) on batches of 50
32x32 images resized to 299x299, 2 threads. Prints images/s as JSON, as
`cargo xtask bench --only fid_inception_features` does.

    pip install torch pytorch-fid
    python scripts/gan/fid_bench.py [--iters 3] [--threads 2]
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from inception_common import fid_inception_random, pytorch_fid_network  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--iters", type=int, default=3)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--batch", type=int, default=50)
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)
net = pytorch_fid_network(fid_inception_random().eval())
x = torch.rand(args.batch, 3, 32, 32)
with torch.no_grad():
    net(x[:2])  # warm-up
    times = []
    for _ in range(args.iters):
        t = time.perf_counter()
        net(x)
        times.append(time.perf_counter() - t)
times.sort()
med = times[len(times) // 2]
print(json.dumps({"fid_inception_features": {"images_per_s": args.batch / med,
                                              "batch": args.batch, "threads": args.threads,
                                              "iters": args.iters, "torch": torch.__version__}}))
