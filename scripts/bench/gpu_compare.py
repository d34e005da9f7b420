"""kiln's `bench --device cuda` lines beside PyTorch's torch_gpu.py lines, one
table: benchmark, batch, kiln, PyTorch, kiln / PyTorch, kiln's peak GPU memory.

usage: python3 gpu_compare.py KILN.jsonl TORCH.jsonl
Lines that are not JSON (progress, warnings) are skipped. A benchmark one side
did not report shows "-". PyTorch's decode lines are matched by batch at f32;
its train line counts tokens per step as "batch" (kiln: rows x seq). Lines
with `phases_ms` (GPT-2 training) add a line of their phases' times.
"""
import json
import sys

UNITS = ("images_per_s", "tokens_per_s")


def lines(path):
    out = []
    with open(path, encoding="utf-8") as f:
        for raw in f:
            raw = raw.strip()
            if not raw.startswith("{"):
                continue
            try:
                v = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if isinstance(v, dict) and "bench" in v:
                out.append(v)
    return out


def key(line, side):
    batch = line.get("batch")
    if side == "kiln" and "seq" in line and batch is not None:
        batch = batch * line["seq"]  # torch_gpu.py's train line counts tokens
    return line["bench"], batch


def metric(line):
    for u in UNITS:
        if u in line:
            return u, float(line[u])
    return None, None


def table(kiln, torch):
    tref = {}
    for t in torch:
        if t.get("dtype", "torch.float32") != "torch.float32":
            continue  # bf16 decode / autocast variants have no kiln twin
        tref.setdefault(key(t, "torch"), t)
    rows = [("benchmark", "batch", "unit", "kiln", "PyTorch", "ratio", "kiln peak MB")]
    for k in kiln:
        name, batch = key(k, "kiln")
        unit, kv = metric(k)
        t = tref.get((name, batch))
        tv = metric(t)[1] if t else None
        ratio = f"{kv / tv:.2f}x" if kv and tv else "-"
        peak = k.get("peak_gpu_mem_mb", "-")
        rows.append((name, str(k.get("batch", "-")), unit or "-", f"{kv:.1f}" if kv else "-",
                     f"{tv:.1f}" if tv else "-", ratio, str(peak)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def main(argv):
    if len(argv) != 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    kiln = lines(argv[1])
    try:
        torch = lines(argv[2])
    except OSError:
        torch = []
    if not kiln:
        print(f"gpu_compare: no benchmark lines in {argv[1]}", file=sys.stderr)
        return 1
    print(table(kiln, torch))
    for k in kiln:
        if isinstance(k.get("phases_ms"), dict):
            parts = ", ".join(f"{n} {v.get('issue')}/{v.get('done')}"
                              for n, v in k["phases_ms"].items() if isinstance(v, dict))
            print(f"{k['bench']} b{k.get('batch')}: ms per phase, host issue/device done: {parts}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
