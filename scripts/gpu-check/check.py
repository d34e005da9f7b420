#!/usr/bin/env python3
"""Run kiln's CUDA kernels (PTX from crates/kiln-core/build.rs) on a GPU with
CuPy and compare them with the kiln CPU ops' outputs that
`cargo xtask export-gpu-refs DIR` wrote (manifest.json + .npy files).

Needs numpy; CuPy only for the real run. Prints one row per kernel with the
max abs error and exits 0 when all pass, 1 on any failure, 2 when CuPy (or a
GPU) is missing. `--dry-run` checks the manifest, the files, that every
kernel is in the PTX and that each launch's arguments match the kernel's
parameters (count and PTX type), without a GPU.
"""
import argparse
import json
import os
import re
import sys
import time

import numpy as np

DTYPES = {"f32": np.float32, "f64": np.float64, "u32": np.uint32}


def load_case_buffers(refs, case):
    """Host arrays for each buffer, and the expected arrays."""
    host, expect = {}, {}
    for name, b in case["buffers"].items():
        if "file" in b:
            host[name] = np.load(os.path.join(refs, b["file"])).reshape(-1)
        else:
            host[name] = np.zeros(int(b["zeros"]), dtype=DTYPES[b["dtype"]])
        if "expect" in b:
            e = np.load(os.path.join(refs, b["expect"])).reshape(-1)
            if e.size != host[name].size:
                raise ValueError(f"{case['name']}: {name} expects {e.size} elements, has {host[name].size}")
            expect[name] = e
    return host, expect


def ptx_entries(path):
    """Each kernel's name and its parameters' PTX types (u64 for pointers and size_t)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    return {
        name: re.findall(r"\.param\s+\.(\w+)", params)
        for name, params in re.findall(r"\.entry\s+([A-Za-z_][A-Za-z0-9_]*)\s*\(([^)]*)\)", text)
    }


# The PTX parameter type each manifest argument kind is passed as.
PTX_TYPES = {"buf": "u64", "u64": "u64", "i32": "u32", "f32": "f32", "f64": "f64"}


def check_args(kernel, params, args):
    """Raises when a launch's arguments do not match the kernel's parameters."""
    kinds = [next(iter(x)) for x in args]
    want = [PTX_TYPES.get(k, "?") for k in kinds]
    if want != params:
        raise ValueError(f"{kernel}: arguments {kinds} (PTX {want}) do not match its parameters {params}")


def scalar(a):
    (k, v), = a.items()
    return {"i32": np.int32, "u64": np.uint64, "f32": np.float32, "f64": np.float64}[k](v)


def compare(got, want, atol, rtol):
    got = got.astype(np.float64)
    want = want.astype(np.float64)
    err = np.abs(got - want)
    finite = bool(np.all(np.isfinite(got)))
    ok = finite and bool(np.all(err <= atol + rtol * np.abs(want)))
    return float(err.max()) if err.size else 0.0, ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ptx", default="scripts/gpu-check/ptx", help="folder with token.ptx, fused.ptx, ...")
    ap.add_argument("--refs", default="scripts/gpu-check/refs", help="folder written by export-gpu-refs")
    ap.add_argument("--dry-run", action="store_true", help="check files and PTX entries only (no GPU)")
    ap.add_argument("--only", default="", help="comma-separated case names")
    a = ap.parse_args()

    manifest_path = os.path.join(a.refs, "manifest.json")
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except OSError as e:
        print(f"gpu-check: cannot read {manifest_path}: {e} (run `cargo xtask export-gpu-refs {a.refs}`)")
        return 1
    if manifest.get("format") != "kiln-gpu-refs/1":
        print(f"gpu-check: {manifest_path}: unknown format {manifest.get('format')!r}")
        return 1
    cases = manifest["cases"]
    if a.only:
        want = set(a.only.split(","))
        cases = [c for c in cases if c["name"] in want]

    # A launch runs a kernel of its case's module unless it names another.
    entries = {}
    for c in cases:
        for m in [c["module"]] + [l.get("module", c["module"]) for l in c["launches"]]:
            if m not in entries:
                p = os.path.join(a.ptx, m + ".ptx")
                if not os.path.exists(p):
                    print(f"gpu-check: missing {p} (build with `cargo xtask cuda-check` or KILN_PTX_DIR)")
                    return 1
                entries[m] = ptx_entries(p)

    cp = None
    if not a.dry_run:
        try:
            import cupy as cp  # noqa: F401
        except ImportError as e:
            print(f"gpu-check: CuPy is not installed ({e}); nothing run. Use --dry-run to check files only.")
            return 2
        try:
            n = cp.cuda.runtime.getDeviceCount()
        except Exception as e:  # CUDARuntimeError without a driver
            print(f"gpu-check: no CUDA device ({e})")
            return 2
        if n == 0:
            print("gpu-check: no CUDA device")
            return 2
        props = cp.cuda.runtime.getDeviceProperties(0)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        print(f"gpu-check: {name}, compute {props['major']}.{props['minor']}, CuPy {cp.__version__}")

    modules = {}
    failed = 0
    t0 = time.time()
    print(f"{'kernel':<28} {'buffer':<8} {'max abs err':>12}  result")
    for c in cases:
        try:
            host, expect = load_case_buffers(a.refs, c)
            for l in c["launches"]:
                m = l.get("module", c["module"])
                if l["kernel"] not in entries[m]:
                    raise ValueError(f"kernel {l['kernel']} not in {m}.ptx")
                check_args(l["kernel"], entries[m][l["kernel"]], l["args"])
                for arg in l["args"]:
                    if "buf" in arg and arg["buf"] not in host:
                        raise ValueError(f"unknown buffer {arg['buf']}")
            if a.dry_run:
                for b in expect:
                    print(f"{c['name']:<28} {b:<8} {'-':>12}  skipped (dry run)")
                continue
            dev = {k: cp.asarray(v) for k, v in host.items()}
            for l in c["launches"]:
                m = l.get("module", c["module"])
                if m not in modules:
                    modules[m] = cp.RawModule(path=os.path.join(a.ptx, m + ".ptx"))
                k = modules[m].get_function(l["kernel"])
                args = tuple(dev[x["buf"]] if "buf" in x else scalar(x) for x in l["args"])
                k(tuple(l["grid"]), tuple(l["block"]), args)
            cp.cuda.Device().synchronize()
            for b, want in expect.items():
                err, ok = compare(cp.asnumpy(dev[b]), want, c["atol"], c["rtol"])
                failed += 0 if ok else 1
                print(f"{c['name']:<28} {b:<8} {err:>12.3e}  {'ok' if ok else 'FAIL'}")
        except Exception as e:  # report and go on with the other kernels
            failed += 1
            print(f"{c['name']:<28} {'-':<8} {'-':>12}  ERROR {type(e).__name__}: {e}")
    dt = time.time() - t0
    mode = "dry run" if a.dry_run else "GPU"
    print(f"gpu-check ({mode}): {len(cases)} cases, {failed} failed, {dt:.1f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
