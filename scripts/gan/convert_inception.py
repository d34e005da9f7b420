"""Converts pytorch-fid's FID InceptionV3 weights to the safetensors file kiln
loads (`cargo xtask eval gan --inception FILE`):

    pip install torch pytorch-fid safetensors
    # pt_inception-2015-12-05-6726825d.pth from
    # https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
    python scripts/gan/convert_inception.py pt_inception-2015-12-05-6726825d.pth inception.safetensors

The names stay pytorch-fid's (`Mixed_5b.branch1x1.conv.weight`, ..., `fc.weight`);
`num_batches_tracked` counters are dropped. The script refuses a state dict
that does not fill pytorch-fid's network exactly, as kiln does.
"""
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from inception_common import fid_inception_random  # noqa: E402


def convert(src, dst):
    sd = torch.load(src, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        sys.exit(f"{src}: expected a state dict, found {type(sd).__name__}")
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    want = {k: tuple(v.shape) for k, v in fid_inception_random().state_dict().items()
            if not k.endswith("num_batches_tracked")}
    problems = [f"{k} {s} is missing" for k, s in want.items() if k not in sd]
    problems += [f"{k} has shape {tuple(sd[k].shape)}, expected {s}"
                 for k, s in want.items() if k in sd and tuple(sd[k].shape) != s]
    problems += [f"{k} is not a weight of the network" for k in sd if k not in want]
    if problems:
        sys.exit(f"{src}: {len(problems)} problem(s): " + "; ".join(problems[:8]))
    save_file({k: v.float().contiguous() for k, v in sd.items()}, dst)
    print(f"wrote {dst}: {len(sd)} tensors, {sum(v.numel() for v in sd.values()):,} values")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: convert_inception.py pt_inception-2015-12-05-6726825d.pth OUT.safetensors")
    convert(sys.argv[1], sys.argv[2])
