"""Writes crates/kiln-gan/tests/fixtures/inception_parts.safetensors: the
outputs of each part of pytorch-fid's FID InceptionV3 (one per block type, and
the whole network at 75x75), made by pytorch-fid's own modules with
hash-generated weights and inputs that the Rust test regenerates, so the
fixture holds outputs only.

    pip install pytorch-fid safetensors
    python scripts/gan/inception_fixtures.py
"""
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from inception_common import fid_inception_random, fill_hashed, hashed_input, pytorch_fid_network  # noqa: E402

torch.set_num_threads(2)
inc = fid_inception_random().eval()
fill_hashed(inc)
net = pytorch_fid_network(inc)
b0, b1, b2, b3 = net.blocks

# (part, module, input shape)
parts = [
    ("block0", b0, (1, 3, 21, 21)),
    ("block1", b1, (1, 64, 11, 11)),
    ("Mixed_5b", inc.Mixed_5b, (1, 192, 5, 5)),  # FIDInceptionA
    ("Mixed_6a", inc.Mixed_6a, (1, 288, 7, 7)),  # InceptionB
    ("Mixed_6b", inc.Mixed_6b, (1, 768, 5, 5)),  # FIDInceptionC
    ("Mixed_7a", inc.Mixed_7a, (1, 768, 7, 7)),  # InceptionD
    ("Mixed_7b", inc.Mixed_7b, (1, 1280, 3, 3)),  # FIDInceptionE_1
    ("Mixed_7c", inc.Mixed_7c, (2, 2048, 3, 3)),  # FIDInceptionE_2
]
out = {}
with torch.no_grad():
    for name, mod, shape in parts:
        out[name] = mod(hashed_input("input." + name, shape)).contiguous()
    # The whole network on a 75x75 image already in [-1, 1] (no resize).
    x = hashed_input("input.whole", (2, 3, 75, 75)) * 2 - 1
    for b in net.blocks:
        x = b(x)
    out["whole"] = x.reshape(2, 2048).contiguous()
    # pytorch-fid's input transform: the resize to 299 (every 13th row and
    # column kept) and an odd-sized one.
    img = hashed_input("input.resize", (1, 2, 32, 32))
    r = F.interpolate(img, size=(299, 299), mode="bilinear", align_corners=False)
    out["resize299"] = r[:, :, ::13, ::13].contiguous()
    img = hashed_input("input.resize_odd", (1, 1, 7, 5))
    out["resize_odd"] = F.interpolate(img, size=(11, 13), mode="bilinear", align_corners=False).contiguous()

path = os.path.join(os.path.dirname(__file__), "../../crates/kiln-gan/tests/fixtures/inception_parts.safetensors")
save_file(out, path)
for k, v in out.items():
    print(k, tuple(v.shape), float(v.abs().max()))
