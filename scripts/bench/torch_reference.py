"""PyTorch CPU reference throughput for the reference chapter's models.

Runs the chapter's VAE (MLP) and masked Conv_AE training steps (see
../REFERENCE.md) and a GPT-2 small (random init) decode loop and train step,
with the same shapes kiln uses, on the same machine, so kiln can be compared
as a ratio in one run. Setup: python3 -m pip install torch transformers

usage: python torch_reference.py [vae|convae|dcgan|gpt2|gpt2train|all] [--threads N]
Prints one JSON line per benchmark.

kiln's copy of ../shared/bench/torch_reference.py: the same benchmarks, names and
shapes; every line also says which machine it ran on (cpu, cores, simd, as
`cargo xtask bench` does, and torch_simd: the kernels PyTorch picked).
`cargo xtask bench --compare` runs it alternately with kiln.
"""
import json, sys, time
import torch
from torch import nn

THREADS = 2
for i, a in enumerate(sys.argv):
    if a == "--threads":
        THREADS = int(sys.argv[i + 1])
torch.set_num_threads(THREADS)
torch.manual_seed(0)


def machine():
    """The CPU model, logical cores and SIMD level, as kiln's bench lines say them."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block says it all
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model = fields.get("model name") or "unknown"
    # A virtual machine may name only the brand ("AMD EPYC"): the family and
    # model numbers tell a Zen 3 from a Zen 4 (kiln's cpu_model says the same).
    if fields.get("cpu family") and fields.get("model"):
        model += f" (family {fields['cpu family']} model {fields['model']})"
    flags = set(fields.get("flags", "").split())
    if "avx512f" in flags:
        simd = "avx512"
    elif "avx2" in flags and "fma" in flags:
        simd = "avx2"
    elif "sse4_2" in flags:
        simd = "sse4.2"
    else:
        simd = "none"
    import os
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "cores": cores, "simd": simd,
            "torch_simd": torch.backends.cpu.get_cpu_capability().lower()}


MACHINE = machine()


def emit(d):
    d.update(MACHINE)
    print(json.dumps(d), flush=True)


class VAE(nn.Module):  # the chapter's architecture
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(3072, 512), nn.ReLU(), nn.Linear(512, 128), nn.ReLU())
        self.fc_mean = nn.Linear(128, 32)
        self.fc_var = nn.Linear(128, 32)
        self.decoder = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 512), nn.ReLU(),
                                     nn.Linear(512, 3072), nn.Sigmoid())

    def forward(self, x):
        h = self.encoder(x.view(-1, 3072))
        mean, logvar = self.fc_mean(h), self.fc_var(h)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        return self.decoder(z), mean, logvar


def vae_loss(recon, x, mu, logvar):
    bce = nn.functional.binary_cross_entropy(recon, x.view(-1, 3072), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld


class ConvAE(nn.Module):  # the chapter's masked-inpainting autoencoder
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.d1 = nn.ConvTranspose2d(32, 8, 2, stride=2)
        self.d2 = nn.ConvTranspose2d(8, 3, 2, stride=2)

    def forward(self, x):
        x = self.pool(torch.relu(self.c1(x)))
        x = self.pool(torch.relu(self.c2(x)))
        x = torch.relu(self.d1(x))
        return torch.sigmoid(self.d2(x))


def bench_train(name, model, step_fn, batch, steps=200, warm=20):
    for _ in range(warm):
        step_fn()
    t = time.perf_counter()
    for _ in range(steps):
        step_fn()
    dt = time.perf_counter() - t
    emit({"bench": name, "threads": THREADS, "batch": batch, "steps": steps,
                      "images_per_s": round(batch * steps / dt, 1), "ms_per_step": round(1000 * dt / steps, 3)})


def vae(batch=32):
    m = VAE()
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    x = torch.rand(batch, 3, 32, 32)

    def step():
        opt.zero_grad()
        r, mu, lv = m(x)
        loss = vae_loss(r, x, mu, lv)
        loss.backward()
        opt.step()
    bench_train("vae_mlp_train_step", m, step, batch)


def convae(batch=32):
    m = ConvAE()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    x = torch.rand(batch, 3, 32, 32)
    mask = torch.ones(3, 32, 32)
    mask[:, 5:13, 9:17] = 0
    crit = nn.MSELoss()

    def step():
        opt.zero_grad()
        loss = crit(m(x * mask), x)
        loss.backward()
        opt.step()
    bench_train("inpaint_convae_train_step", m, step, batch)


class DcganG(nn.Module):  # DCGAN (Radford et al. 2015) at 32x32: nz=100, ngf=64
    def __init__(self, nz=100, ngf=64):
        super().__init__()
        self.net = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
            nn.ConvTranspose2d(ngf, 3, 4, 2, 1, bias=False), nn.Tanh())

    def forward(self, z):
        return self.net(z)


class DcganD(nn.Module):  # ndf=64, outputs one logit per image
    def __init__(self, ndf=64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * 4, 1, 4, 1, 0, bias=False))

    def forward(self, x):
        return self.net(x).view(-1)


def dcgan(batch=64):
    g, d = DcganG(), DcganD()
    og = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    od = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    bce = nn.BCEWithLogitsLoss()
    real = torch.rand(batch, 3, 32, 32) * 2 - 1
    ones, zeros = torch.ones(batch), torch.zeros(batch)

    def step():
        z = torch.randn(batch, 100, 1, 1)
        fake = g(z)
        od.zero_grad()
        (bce(d(real), ones) + bce(d(fake.detach()), zeros)).backward()
        od.step()
        og.zero_grad()
        bce(d(fake), ones).backward()  # non-saturating generator loss
        og.step()
    bench_train("dcgan32_train_iter", None, step, batch, steps=30, warm=3)


def gpt2_decode(prompt_len=32, new_tokens=64):
    from transformers import GPT2Config, GPT2LMHeadModel
    m = GPT2LMHeadModel(GPT2Config()).eval()
    ids = torch.randint(0, 50257, (1, prompt_len))
    with torch.no_grad():
        m.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)  # warm-up
        t = time.perf_counter()
        out = m.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        dt = time.perf_counter() - t
    n = out.shape[1] - prompt_len
    emit({"bench": "gpt2_small_greedy_decode", "threads": THREADS, "prompt": prompt_len,
                      "new_tokens": int(n), "tokens_per_s": round(n / dt, 2)})


def gpt2_train(batch=8, seq=128, steps=5):
    from transformers import GPT2Config, GPT2LMHeadModel
    m = GPT2LMHeadModel(GPT2Config())
    opt = torch.optim.AdamW(m.parameters(), lr=1e-5)
    ids = torch.randint(0, 50257, (batch, seq))

    def step():
        opt.zero_grad()
        m(ids, labels=ids).loss.backward()
        opt.step()
    step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    dt = time.perf_counter() - t
    emit({"bench": "gpt2_small_train_step", "threads": THREADS, "batch": batch, "seq": seq,
                      "tokens_per_s": round(batch * seq * steps / dt, 1)})


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("--") else "all"
    if what in ("vae", "all"):
        vae()
    if what in ("convae", "all"):
        convae()
    if what in ("dcgan", "all"):
        dcgan()
    if what in ("gpt2", "all"):
        gpt2_decode()
    if what in ("gpt2train", "all"):
        gpt2_train()
