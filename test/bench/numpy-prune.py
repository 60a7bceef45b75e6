"""numpy peer of `dppa prune --method dp` for the benchmark (never part of the product).

Same work: per tensor, delta in fp32 from bf16 files, DP significance (linear and
layer level, magnitude share, N = 5), rates with lambda = 0.08, exact top-k by
np.argpartition, positions and bf16 values written out (uncompressed .npz).
usage: numpy-prune.py BASE_DIR FT_DIR RATE OUT.npz
"""
import json, re, struct, sys
import numpy as np

def tensors(path):
    f = f"{path}/model.safetensors"
    with open(f, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return f, 8 + n, header

def read(f, start, info):
    a, b = info["data_offsets"]
    raw = np.fromfile(f, dtype=np.uint16, count=(b - a) // 2, offset=start + a)
    return (raw.astype(np.uint32) << 16).view(np.float32)

def delta(name):
    return read(ff, sf, hf[name]) - read(fb, sb, hb[name])

def to_bf16(x):
    u = x.view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)

base, ft, rate, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
fb, sb, hb = tensors(base)
ff, sf, hf = tensors(ft)
lam, N = 0.08, 5.0
layer_re = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
linears = [k for k, v in hb.items() if layer_re.search(k) and len(v["shape"]) == 2 and k.endswith(".weight")]

stats = {}
for name in linears:
    a = np.abs(delta(name))
    s = float(a.sum(dtype=np.float64))
    m = s / a.size
    stats[name] = (s, a.size, float(a[a > N * m].sum(dtype=np.float64)))
layers = {}
for name in linears:
    layers.setdefault(int(layer_re.search(name).group(1)), []).append(name)
layer_sig = {}
for l, names in layers.items():
    s = sum(stats[n][0] for n in names); c = sum(stats[n][1] for n in names)
    thr = N * s / c
    o = 0.0
    for n in names:
        a = np.abs(delta(n)); o += float(a[a > thr].sum(dtype=np.float64))
    layer_sig[l] = o / s if s else 0.0
ls = np.array(list(layer_sig.values())); d = ls.mean() - ls
L = dict(zip(layer_sig.keys(), lam * d / np.abs(d).max() if np.abs(d).max() > 0 else d * 0))
sig = {n: (stats[n][2] / stats[n][0] if stats[n][0] else 0.0) for n in linears}
w = sum(sig[n] * stats[n][1] for n in linears) / sum(stats[n][1] for n in linears)
e = {n: w - sig[n] for n in linears}; emax = max(abs(v) for v in e.values())
result = {}
for name in linears:
    l = int(layer_re.search(name).group(1))
    theta = min(1.0, max(0.0, rate + L[l] + (lam * e[name] / emax if emax else 0.0)))
    dl = delta(name); n = dl.size; k = n - int(np.floor(theta * n))
    idx = np.sort(np.argpartition(np.abs(dl), n - k)[n - k:]) if k > 0 else np.zeros(0, np.int64)
    result[name + ".pos"] = idx
    result[name + ".val"] = to_bf16(dl[idx])
np.savez(out, **result)
