"""Fixture for kiln-gan's clean-fid resize (`Resize::Clean`, `resize_clean`).

clean-fid's `mode="clean"` resizer (cleanfid/resize.py, `make_resizer("PIL",
False, "bicubic", (299, 299))`) does, for each channel of a uint8 HxWx3 image:

    img = Image.fromarray(x_np.astype(np.float32), mode='F')
    img = img.resize(output_size, resample=Image.BICUBIC)
    return np.asarray(img).clip(0, 255).reshape(s2, s1, 1)

This script does the same to a few images whose uint8 pixels come from a
32-bit LCG (reproduced in the Rust test, so no input file is needed), and
writes crates/kiln-gan/tests/fixtures/clean_resize.json: for each image, its
size, the output size, every 13th row and column of the output (all
channels, in [0, 255], before the division by 255) and each channel's f64 sum.

    python3 scripts/gan/clean_resize_fixture.py   # needs pillow and numpy
"""

import json
import os

import numpy as np
import PIL
from PIL import Image

CASES = [  # (seed, height, width, out_h, out_w)
    (1, 32, 32, 299, 299),
    (2, 64, 64, 299, 299),
    (3, 32, 48, 299, 299),
    (4, 333, 400, 299, 299),  # shrinking: the antialiased (widened) filter
    (5, 7, 5, 9, 3),  # tiny, one axis shrinks and the other grows
]
STEP = 13


def lcg_image(seed, h, w):
    """uint8 [h, w, 3], channel-major order of draws: state = state *
    1664525 + 1013904223 (mod 2^32), value = state >> 24."""
    state = seed
    out = np.zeros((3, h, w), dtype=np.uint8)
    for c in range(3):
        for y in range(h):
            for x in range(w):
                state = (state * 1664525 + 1013904223) % (1 << 32)
                out[c, y, x] = state >> 24
    return out.transpose(1, 2, 0)


def clean_resize(x, out_h, out_w):
    def one(ch):
        img = Image.fromarray(ch.astype(np.float32), mode="F")
        img = img.resize((out_w, out_h), resample=Image.BICUBIC)
        return np.asarray(img).clip(0, 255).reshape(out_h, out_w, 1)

    return np.concatenate([one(x[:, :, i]) for i in range(3)], axis=2).astype(np.float32)


def main():
    cases = []
    for seed, h, w, oh, ow in CASES:
        y = clean_resize(lcg_image(seed, h, w), oh, ow)
        rows = list(range(0, oh, STEP))
        cols = list(range(0, ow, STEP))
        cases.append(
            {
                "seed": seed,
                "size": [h, w],
                "out": [oh, ow],
                "rows": rows,
                "cols": cols,
                # [channel][row][col] at the sampled rows and columns
                "sampled": [[[float(y[r, c, ch]) for c in cols] for r in rows] for ch in range(3)],
                "channel_sums": [float(y[:, :, ch].astype(np.float64).sum()) for ch in range(3)],
            }
        )
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "..", "..", "crates", "kiln-gan", "tests", "fixtures", "clean_resize.json")
    with open(path, "w") as f:
        json.dump({"pillow": PIL.__version__, "step": STEP, "cases": cases}, f)
    print(f"Pillow {PIL.__version__}: wrote {len(cases)} cases to {os.path.normpath(path)}")
    for c in cases:
        print(c["size"], "->", c["out"], "channel sums", c["channel_sums"])


if __name__ == "__main__":
    main()
