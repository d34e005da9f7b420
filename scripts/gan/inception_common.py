"""Shared by the InceptionV3 scripts: pytorch-fid's FID network built without
downloading its weights, and the hash-generated weights and inputs that kiln's
parity tests regenerate in Rust (crates/kiln-gan/tests/inception.rs)."""
import math

import numpy as np
import torch
from pytorch_fid import inception as pfi

M = 2**64 - 1


def fnv1a(name):
    h = 0xCBF29CE484222325
    for b in name.encode():
        h ^= b
        h = (h * 0x100000001B3) & M
    return h


def uniform(name, n):
    """n values in [0, 1) from a hash of (name, index); same as the Rust test."""
    seed = fnv1a(name)
    k = np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = k * np.uint64(6364136223846793005) + np.uint64(seed) + np.uint64(1)
        h ^= h >> np.uint64(29)
        h = h * np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(32)
    return (h >> np.uint64(11)).astype(np.float64) / 2.0**53


def hashed_weight(name, shape):
    n = int(np.prod(shape))
    u = uniform(name, n)
    if name.endswith(".conv.weight") or name == "fc.weight":
        fan_in = int(np.prod(shape[1:]))
        v = (2 * u - 1) * math.sqrt(6.0 / fan_in)  # He-uniform: activations stay O(1)
    elif name.endswith(".bn.weight") or name.endswith(".bn.running_var"):
        v = 0.5 + u
    else:  # bn.bias, bn.running_mean, fc.bias
        v = (2 * u - 1) * 0.2
    return torch.from_numpy(v.astype(np.float32).reshape(shape))


def hashed_input(name, shape):
    return torch.from_numpy(uniform(name, int(np.prod(shape))).astype(np.float32).reshape(shape))


def fid_inception_random():
    """pytorch-fid's fid_inception_v3() without the weight download."""
    inc = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    inc.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    inc.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    inc.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    inc.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    inc.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    inc.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    inc.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    inc.Mixed_7b = pfi.FIDInceptionE_1(1280)
    inc.Mixed_7c = pfi.FIDInceptionE_2(2048)
    return inc


def pytorch_fid_network(inc):
    """pytorch_fid.inception.InceptionV3([3]) around the network `inc`."""
    orig = pfi.fid_inception_v3
    pfi.fid_inception_v3 = lambda: inc
    try:
        return pfi.InceptionV3([3]).eval()
    finally:
        pfi.fid_inception_v3 = orig


def fill_hashed(module):
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not name.endswith("num_batches_tracked"):
                t.copy_(hashed_weight(name, tuple(t.shape)))
