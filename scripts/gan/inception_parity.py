"""End-to-end parity of kiln's InceptionV3 with pytorch-fid's (opt-in; the
published weights cannot be downloaded here, so the network gets random
weights). Builds pytorch-fid's FID InceptionV3 with torch's initialisation and
random batch-norm statistics, converts it with convert_inception.py, and runs
pytorch-fid's InceptionV3([3]) (resize to 299, 2x - 1) on random 32x32 images:

    pip install torch pytorch-fid safetensors
    python scripts/gan/inception_parity.py --out /tmp/inception-parity
    KILN_INCEPTION_PARITY=/tmp/inception-parity \
        cargo test --release -p kiln-gan --test inception_e2e -- --ignored --nocapture
"""
import argparse
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from convert_inception import convert  # noqa: E402
from inception_common import fid_inception_random, pytorch_fid_network  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--n", type=int, default=4)
args = ap.parse_args()
os.makedirs(args.out, exist_ok=True)
torch.manual_seed(0)
inc = fid_inception_random().eval()
with torch.no_grad():
    for m in inc.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
pth = os.path.join(args.out, "random_inception.pth")
torch.save(inc.state_dict(), pth)
convert(pth, os.path.join(args.out, "inception.safetensors"))
net = pytorch_fid_network(inc)
images = torch.rand(args.n, 3, 32, 32)
with torch.no_grad():
    feats = net(images)[0].reshape(args.n, 2048)
    logits = feats @ inc.fc.weight.T
save_file({"images": images, "features": feats.contiguous(), "logits": logits.contiguous()},
          os.path.join(args.out, "parity.safetensors"))
print("features: mean |f| %.4f, max |f| %.4f" % (feats.abs().mean(), feats.abs().max()))
