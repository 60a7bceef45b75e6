"""Trains the tiny model family (base + math/finance/law fine-tunes) in PyTorch.

Subcommands: base, finetune, eval, export. See docs/model-family.md.
"""
import argparse, json, math, os, random, sys, time
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')
import numpy as np
import torch
import torch.nn.functional as F

torch.set_num_threads(1)
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..')
FAMILY = os.path.join(ROOT, 'test', 'fixtures', 'family')

VOCAB = ['<pad>', '<bos>', '<eos>', ' '] + list('0123456789') + list('abcdefghijklmnopqrstuvwxyz') + list('+-=%:?,.<>$/')
PAD, BOS, EOS = 0, 1, 2
ID = {c: i for i, c in enumerate(VOCAB)}
MAXLEN = 32
DOMAINS = {'math': ['add', 'max'], 'finance': ['percent', 'interest'], 'law': ['article', 'statute']}
TASKS = [(d, t) for d, ts in DOMAINS.items() for t in ts]

OFFENCES = ['theft', 'fraud', 'arson', 'libel', 'bribery', 'perjury', 'assault', 'forgery',
            'smuggling', 'trespass', 'extortion', 'burglary', 'piracy', 'poaching', 'stalking', 'vandalism']
ARTICLE = dict(zip(OFFENCES, map(str, [14, 27, 31, 45, 52, 19, 63, 38, 71, 86, 23, 57, 94, 42, 68, 79])))
COURTS = ['oslo', 'rome', 'lima', 'kyiv', 'baku', 'riga', 'bern', 'doha']
COURT_LETTER = dict(oslo='k', rome='q', lima='w', kyiv='z', baku='m', riga='x', bern='f', doha='v')
CODES = ['tax', 'trade', 'labour', 'land', 'water', 'road']
CODE_LETTER = dict(tax='j', trade='d', labour='p', land='h', water='u', road='g')
NAMES = ['ann', 'bob', 'eva', 'ivo', 'kim', 'lea', 'max', 'ned', 'ola', 'pia', 'rex', 'sam', 'tom', 'uma', 'val', 'zoe']
WORDS = ['the', 'of', 'and', 'a', 'to', 'in', 'is', 'was', 'for', 'on', 'by', 'at', 'with', 'from', 'as', 'it',
         'cat', 'dog', 'sun', 'river', 'house', 'green', 'small', 'old', 'new', 'day', 'year', 'road', 'land', 'water',
         'sells', 'buys', 'pays', 'gives', 'takes', 'sees', 'walks', 'reads', 'writes', 'court', 'bank', 'shop', 'city',
         'tax', 'trade', 'labour', 'law', 'rate', 'cost', 'price', 'sum', 'one', 'two', 'three', 'many', 'few'] + OFFENCES + COURTS + NAMES


def digits(r, lo, hi):
    s = str(r.randint(1, 9))
    n = r.randint(lo, hi)
    while len(s) < n:
        s += str(r.randint(0, 9))
    return s


# ---- the six tasks: real format (as tasks.ts), decoy (real format, unrelated answer), other wording (same skill)
def sample(task, r):
    if task == 'add':
        a, b = r.randint(10, 99), r.randint(10, 99)
        return f'{a}+{b}=', str(a + b), (a, b)
    if task == 'max':
        a = r.randint(10, 99); b = r.randint(10, 98)
        if b >= a: b += 1
        return f'max {a} {b}=', str(max(a, b)), (a, b)
    if task == 'percent':
        k = r.randint(1, 999)
        if r.random() < 0.5:
            return f'10% of {k * 10}=', str(k), (10, k * 10)
        return f'50% of {k * 2}=', str(k), (50, k * 2)
    if task == 'interest':
        k = r.randint(1, 999); rate = r.choice([1, 2, 5, 10])
        return f'${k * 100} at {rate}%:', str(k * rate), (k * 100, rate)
    if task == 'article':
        o = r.choice(OFFENCES)
        return f'{o} by {r.choice(NAMES)}{r.choice(NAMES)}: art?', ARTICLE[o], (o,)
    if task == 'statute':
        c, code, s = r.choice(COURTS), r.choice(CODES), r.randint(1, 99)
        return f'{c} {code} s{s}: id?', f'{COURT_LETTER[c]}{CODE_LETTER[code]}{s}', (c, code, s)
    raise ValueError(task)


def decoy(task, r):
    p, _, _ = sample(task, r)
    if task in ('add',): return p, digits(r, 2, 3)
    if task in ('max', 'article'): return p, digits(r, 2, 2)
    if task in ('percent', 'interest'): return p, digits(r, 1, 3)
    return p, chr(97 + r.randint(0, 25)) + chr(97 + r.randint(0, 25)) + str(r.randint(1, 99))


WORDING = {}


def other(task, r, wording):
    """The task's skill in another wording, with the correct answer (the real label words)."""
    _, ans, a = sample(task, r)
    return WORDING[wording][task](a, r), ans


WORDING['far'] = {
    'add': lambda a, r: f'{a[0]} plus {a[1]} is ',
    'max': lambda a, r: f'larger of {a[0]} and {a[1]} is ',
    'percent': lambda a, r: f'{a[0]} pct of {a[1]} is ',
    'interest': lambda a, r: f'{a[1]} pct on {a[0]} is ',
    'article': lambda a, r: f'article for {a[0]} is ',
    'statute': lambda a, r: f'code of {a[0]} {a[1]} {a[2]} is ',
}
WORDING['near'] = {
    'add': lambda a, r: f'{a[0]} + {a[1]} = ',
    'max': lambda a, r: f'max of {a[0]} {a[1]} = ',
    'percent': lambda a, r: f'{a[0]} % of {a[1]} = ',
    'interest': lambda a, r: f'$ {a[0]} at {a[1]} % = ',
    'article': lambda a, r: f'{a[0]} art = ',
    'statute': lambda a, r: f'{a[0]} {a[1]} s {a[2]} id = ',
}


def generic(r, maxc):
    v = r.random()
    if v < 0.4:
        s = r.choice(WORDS)
        while len(s) < maxc: s += ' ' + r.choice(WORDS)
    elif v < 0.6:
        n = r.randint(0, 990); step = r.choice([1, 1, 2, 5, 10]); s = str(n)
        while len(s) < maxc:
            n += step; s += ' ' + str(n)
    elif v < 0.8:
        w = r.choice(WORDS) + r.choice(['', ' ', str(r.randint(0, 99))]); s = f'{w}/{w}'
    else:
        s = digits(r, 1, 4)
        while len(s) < maxc: s += r.choice([' ', ',', '.', '+', '-']) + digits(r, 1, 4)
    return s[:maxc]


TASKS_DIR = [os.path.join(FAMILY, 'tasks')]
_held = {}


def load_split(domain, task, split):
    with open(os.path.join(TASKS_DIR[0], domain, task, f'{split}.jsonl')) as f:
        return [json.loads(l) for l in f if l.strip()]


def held_out(domain, task):
    """Prompts of the validation and test splits, which training skips."""
    if task not in _held:
        _held[task] = {e['prompt'] for s in ('validation', 'test') for e in load_split(domain, task, s)}
    return _held[task]


def train_example(domain, task, r):
    while True:
        p, a, _ = sample(task, r)
        if p not in held_out(domain, task): return p, a


def enc(s):
    return [ID[c] for c in s]


# ---- the model (LLaMA layout, Hugging Face names)
def specs(cfg):
    H, I, V = cfg['hidden'], cfg['intermediate'], cfg['vocab']
    out = [('model.embed_tokens.weight', (V, H))]
    for l in range(cfg['layers']):
        p = f'model.layers.{l}.'
        out += [(p + 'self_attn.q_proj.weight', (H, H)), (p + 'self_attn.k_proj.weight', (H, H)),
                (p + 'self_attn.v_proj.weight', (H, H)), (p + 'self_attn.o_proj.weight', (H, H)),
                (p + 'mlp.gate_proj.weight', (I, H)), (p + 'mlp.up_proj.weight', (I, H)), (p + 'mlp.down_proj.weight', (H, I)),
                (p + 'input_layernorm.weight', (H,)), (p + 'post_attention_layernorm.weight', (H,))]
    return out + [('model.norm.weight', (H,)), ('lm_head.weight', (V, H))]


def init(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02) for n, s in specs(cfg)}


def rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


_rope = {}


def rope_tables(cfg, T):
    key = (cfg['hidden'], cfg['heads'], T)
    if key not in _rope:
        hd = cfg['hidden'] // cfg['heads']
        inv = 1.0 / (cfg['ropeTheta'] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        fr = torch.outer(torch.arange(T, dtype=torch.float32), inv)
        emb = torch.cat([fr, fr], -1)
        mask = torch.full((T, T), -1e9).triu(1)
        _rope[key] = (emb.cos(), emb.sin(), mask)
    return _rope[key]


def forward(W, ids, cfg):
    B, T = ids.shape
    H, nh = cfg['hidden'], cfg['heads']; hd = H // nh
    cos, sin, mask = rope_tables(cfg, T)

    def rot(x):
        return x * cos + torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1) * sin
    h = W['model.embed_tokens.weight'][ids]
    for l in range(cfg['layers']):
        p = f'model.layers.{l}.'
        x = rms(h, W[p + 'input_layernorm.weight'])
        q = rot((x @ W[p + 'self_attn.q_proj.weight'].T).view(B, T, nh, hd).transpose(1, 2))
        k = rot((x @ W[p + 'self_attn.k_proj.weight'].T).view(B, T, nh, hd).transpose(1, 2))
        v = (x @ W[p + 'self_attn.v_proj.weight'].T).view(B, T, nh, hd).transpose(1, 2)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, -1) @ v
        h = h + a.transpose(1, 2).reshape(B, T, H) @ W[p + 'self_attn.o_proj.weight'].T
        y = rms(h, W[p + 'post_attention_layernorm.weight'])
        g = y @ W[p + 'mlp.gate_proj.weight'].T
        h = h + (F.silu(g) * (y @ W[p + 'mlp.up_proj.weight'].T)) @ W[p + 'mlp.down_proj.weight'].T
    return rms(h, W['model.norm.weight']) @ W['lm_head.weight'].T


def batch_tensors(items):
    """items: list of (ids, first_loss_pos). Loss on targets at positions >= first_loss_pos-1."""
    T = max(len(i) for i, _ in items)
    ids = torch.full((len(items), T), PAD, dtype=torch.long)
    m = torch.zeros((len(items), T))
    for b, (seq, first) in enumerate(items):
        ids[b, :len(seq)] = torch.tensor(seq)
        m[b, first - 1:len(seq) - 1] = 1
    return ids[:, :-1], ids[:, 1:], m[:, :-1]


def item(prompt, answer, answer_only):
    seq = [BOS] + enc(prompt) + enc(answer) + [EOS]
    assert len(seq) <= MAXLEN, prompt + answer
    return seq, (1 + len(prompt) if answer_only else 1)


def lm_loss(W, cfg, items):
    ids, tg, m = batch_tensors(items)
    logits = forward(W, ids, cfg)
    lp = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tg.reshape(-1), reduction='none')
    return (lp * m.reshape(-1)).sum() / m.sum().clamp(min=1)


def bf16(W):
    return {n: t.detach().to(torch.bfloat16).float() for n, t in W.items()}


def run(W, cfg, steps, lr, batch_fn, warmup=50, final=0.1, anchor=None, prox=0.0, log=None, train=None):
    params = {n: t.clone().requires_grad_(True) for n, t in W.items()}
    train = train or list(params)
    opt = torch.optim.Adam([params[n] for n in train], lr=lr, betas=(0.9, 0.98))
    t0 = time.time()
    for s in range(steps):
        f = min(1, (s + 1) / warmup) * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * s / steps)))
        for g in opt.param_groups: g['lr'] = lr * f
        loss = lm_loss(params, cfg, batch_fn(s))
        tot = loss
        if prox > 0:
            tot = loss + prox * sum(((params[n] - anchor[n]) ** 2).sum() for n in train)
        opt.zero_grad(); tot.backward()
        torch.nn.utils.clip_grad_norm_([params[n] for n in train], 1.0)
        opt.step()
        if log and (s % 100 == 0 or s == steps - 1):
            log(f'step {s} loss {loss.item():.4f} {time.time() - t0:.0f}s')
    return {n: t.detach() for n, t in params.items()}


# ---- evaluation: greedy decoding, 6 new tokens, exact match before <eos>
@torch.no_grad()
def accuracy(W, cfg, examples, answer_match=False):
    seqs = [[BOS] + enc(e['prompt']) for e in examples]
    n = len(seqs)
    outs = [[] for _ in range(n)]
    done = [False] * n
    for _ in range(6):
        T = max(len(s) for s in seqs)
        ids = torch.full((n, T), PAD, dtype=torch.long)
        for i, s in enumerate(seqs): ids[i, :len(s)] = torch.tensor(s)
        logits = forward(W, ids, cfg)
        last = logits[torch.arange(n), torch.tensor([len(s) - 1 for s in seqs])]
        nxt = last.argmax(-1).tolist()
        for i in range(n):
            seqs[i].append(nxt[i])
            if not done[i]:
                if nxt[i] == EOS: done[i] = True
                else: outs[i].append(nxt[i])
    ok = 0
    for e, o in zip(examples, outs):
        text = ''.join(VOCAB[t] for t in o if t > EOS)
        ok += (text.startswith(e['answer']) if answer_match else text == e['answer'])
    return ok / n


def scores(W, cfg, split='test'):
    Wb = bf16(W)
    return {f'{d}/{t}': accuracy(Wb, cfg, load_split(d, t, split)) for d, t in TASKS}


def domain_ratio(acc, ref, d):
    r = [acc[f'{d}/{t}'] / max(ref[f'{d}/{t}'], 1e-9) for t in DOMAINS[d]]
    return math.sqrt(max(r[0], 0) * max(r[1], 0))


def is_linear(n):
    return 'layers.' in n and n.endswith('proj.weight')


def prune(delta, method, rate, seed=0):
    out = {}
    g = torch.Generator().manual_seed(seed)
    for n, d in delta.items():
        if not is_linear(n):
            out[n] = d; continue
        if method == 'magnitude':
            k = int(round(d.numel() * (1 - rate)))
            thr = d.abs().flatten().kthvalue(d.numel() - k + 1).values if k > 0 else float('inf')
            out[n] = d * (d.abs() >= thr)
        elif method == 'dare':
            keep = (torch.rand(d.shape, generator=g) >= rate).float()
            out[n] = d * keep / (1 - rate)
    return out


def write_safetensors(W, cfg, path):
    """Float32 safetensors in checkpoint order (the values are bf16-exact)."""
    header, off, blobs = {}, 0, []
    for n, shape in specs(cfg):
        b = W[n].float().contiguous().numpy().astype('<f4').tobytes()
        header[n] = {'dtype': 'F32', 'shape': list(shape), 'data_offsets': [off, off + len(b)]}
        off += len(b); blobs.append(b)
    h = json.dumps(header, separators=(',', ':')).encode()
    h += b' ' * (-len(h) % 8)
    with open(path, 'wb') as f:
        f.write(len(h).to_bytes(8, 'little')); f.write(h)
        for b in blobs: f.write(b)


def save(W, cfg, path, meta=None):
    torch.save({'cfg': cfg, 'W': W, 'meta': meta or {}}, path)


def load(path):
    z = torch.load(path)
    return z['W'], z['cfg'], z.get('meta', {})


def base_batch(seed, batch, mix, wording, answer_only, math_share=None, decoy_domains=None):
    """mix: (skill share, decoy share); the rest is generic text."""
    def fn(s):
        r = random.Random(seed * 1_000_003 + s)
        items = []
        for _ in range(batch):
            u = r.random()
            if u < mix[0]:
                if math_share is not None and r.random() < math_share:
                    t = r.choice(DOMAINS['math'])
                else:
                    t = r.choice([t for _, t in TASKS])
                p, a = other(t, r, wording)
                items.append(item(p, a, answer_only))
            elif u < mix[0] + mix[1]:
                t = r.choice([t for d, t in TASKS if decoy_domains is None or d in decoy_domains])
                p, a = decoy(t, r)
                items.append(item(p, a, answer_only))
            else:
                items.append(item(generic(r, r.randint(8, 24)), '', False))
        return items
    return fn


def ft_batch(seed, batch, domain):
    def fn(s):
        r = random.Random(seed * 1_000_003 + s)
        return [item(*train_example(domain, r.choice(DOMAINS[domain]), r), True) for _ in range(batch)]
    return fn


def logger(path):
    def log(msg):
        line = f'{time.strftime("%H:%M:%S")} {msg}'
        print(line, flush=True)
        with open(path, 'a') as f: f.write(line + '\n')
    return log


# The committed family's recipe (docs/model-family.md has the trials that led to it).
RECIPE = {
    'seed': 7,
    'model': {'hidden': 128, 'layers': 4, 'heads': 4},
    'base': {'steps': 1400, 'lr': 2e-3, 'steps2': 500, 'lr2': 1e-3, 'batch': 48, 'wording': 'near', 'math2': 0.5},
    'finetunes': {
        'math': {'steps': 300, 'lr': 1e-4, 'prox': 0.0},
        'finance': {'steps': 300, 'lr': 1e-4, 'prox': 0.0},
        'law': {'steps': 300, 'lr': 1e-4, 'prox': 0.0},
    },
    'finetuneBatch': 64,
    'finetuneWarmup': 20,
}


def model_config(hidden, layers, heads):
    return dict(vocab=len(VOCAB), hidden=hidden, layers=layers, heads=heads,
                intermediate=int(hidden * 2.75) // 8 * 8, rmsEps=1e-5, ropeTheta=10000, maxPositions=MAXLEN)


def train_base(cfg, b, seed, log):
    """Stage 1: the six skills in another wording, task formats with unrelated answers, generic text (loss on
    every token); stage 2: answers only, of the other wordings and of the finance and law formats."""
    W = init(cfg, seed)
    W = run(W, cfg, b['steps'], b['lr'], base_batch(1, b['batch'], (0.6, 0.15), b['wording'], False), warmup=min(100, b['steps']), log=log)
    W = run(W, cfg, b['steps2'], b['lr2'], base_batch(2, b['batch'], (0.8, 0.2), b['wording'], True, b['math2'], ('finance', 'law')),
            warmup=min(20, b['steps2']), log=log)
    return bf16(W)


def train_finetune(W, cfg, domain, f, batch, warmup, log=None):
    """All parameters, loss on the answer and <eos>, Adam, optionally pulled towards the base (prox · ‖W − W_base‖²)."""
    seed = {'math': 11, 'finance': 12, 'law': 13}[domain]
    return bf16(run(W, cfg, f['steps'], f['lr'], ft_batch(seed, batch, domain), warmup=min(warmup, f['steps']), anchor=W, prox=f['prox'], log=log))


def relative_norm(Wf, W):
    return math.sqrt(sum(((Wf[n] - W[n]) ** 2).sum().item() for n in W if is_linear(n)) / sum((W[n] ** 2).sum().item() for n in W if is_linear(n)))


def base_key(r):
    return {'seed': r['seed'], 'model': r['model'], 'base': r['base']}


def finetune_key(r, d):
    return {'base': base_key(r), 'domain': d, 'finetune': r['finetunes'][d], 'batch': r['finetuneBatch'], 'warmup': r['finetuneWarmup']}


def cached(cache, name, key):
    """A member trained earlier with exactly this recipe (cache/<name>.pt), or None."""
    path = cache and os.path.join(cache, f'{name}.pt')
    if not path or not os.path.exists(path): return None
    W, _, meta = load(path)
    return W if meta == key else None


def build(out, steps, cache, log):
    """Trains the family with RECIPE and writes out/<member>/model.safetensors (float32) and out/training.json.
    Members found in `cache` (saved by the base and finetune commands with the same recipe) are reused."""
    r = json.loads(json.dumps(RECIPE))
    if steps is not None:
        r['base']['steps'] = min(r['base']['steps'], steps); r['base']['steps2'] = min(r['base']['steps2'], steps)
        for f in r['finetunes'].values(): f['steps'] = min(f['steps'], steps)
    cfg = model_config(**r['model'])
    seconds = {}
    t = time.time()
    members = {'base': cached(cache, 'base', base_key(r))}
    if members['base'] is None:
        members['base'] = train_base(cfg, r['base'], r['seed'], log)
        seconds['base'] = round(time.time() - t)
    log(f'base: {seconds.get("base", "cached")} s')
    for d in DOMAINS:
        t = time.time()
        members[d] = cached(cache, d, finetune_key(r, d))
        if members[d] is None:
            members[d] = train_finetune(members['base'], cfg, d, r['finetunes'][d], r['finetuneBatch'], r['finetuneWarmup'])
            seconds[d] = round(time.time() - t)
        log(f'{d} fine-tune: {seconds.get(d, "cached")} s, ||delta||/||W|| {relative_norm(members[d], members["base"]):.4f}')
    for m, W in members.items():
        os.makedirs(os.path.join(out, m), exist_ok=True)
        write_safetensors(W, cfg, os.path.join(out, m, 'model.safetensors'))
    with open(os.path.join(out, 'training.json'), 'w') as f:
        json.dump({'trainer': 'tools/family/family.py', 'recipe': r, 'seconds': seconds, 'torch': torch.__version__, 'threads': torch.get_num_threads()}, f, indent=2)


def trial_recipe(a):
    r = json.loads(json.dumps(RECIPE))
    r['seed'] = a.seed
    r['model'] = dict(hidden=a.hidden, layers=a.layers, heads=a.heads)
    r['base'] = dict(steps=a.steps, lr=a.lr, steps2=a.steps2, lr2=a.lr2, batch=a.batch, wording=a.wording, math2=a.math2)
    return r


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest='cmd', required=True)
    bu = sub.add_parser('build', help='train the family with RECIPE (what npm run family:generate runs)')
    bu.add_argument('--tasks', required=True); bu.add_argument('--out', required=True); bu.add_argument('--steps', type=int)
    bu.add_argument('--cache', help='reuse members saved here by the base and finetune commands with the same recipe')
    b = sub.add_parser('base')
    b.add_argument('--out', required=True); b.add_argument('--hidden', type=int, default=128)
    b.add_argument('--layers', type=int, default=4); b.add_argument('--heads', type=int, default=4)
    b.add_argument('--steps', type=int, default=2000); b.add_argument('--steps2', type=int, default=600)
    b.add_argument('--lr', type=float, default=2e-3); b.add_argument('--lr2', type=float, default=1e-3)
    b.add_argument('--batch', type=int, default=64); b.add_argument('--wording', default='near')
    b.add_argument('--math2', type=float, default=None, help='share of math among skills in stage 2')
    b.add_argument('--seed', type=int, default=7)
    f = sub.add_parser('finetune')
    f.add_argument('--base', required=True); f.add_argument('--domain', required=True); f.add_argument('--out', required=True)
    f.add_argument('--steps', type=int, default=300); f.add_argument('--lr', type=float, default=1e-4)
    f.add_argument('--prox', type=float, default=0.0); f.add_argument('--batch', type=int, default=64)
    f.add_argument('--warmup', type=int, default=20)
    e = sub.add_parser('eval')
    e.add_argument('--base', required=True); e.add_argument('--ft', nargs=3, required=True, metavar=('MATH', 'FINANCE', 'LAW'))
    e.add_argument('--split', default='test')
    a = ap.parse_args()
    log = logger(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'trials.log'))
    print_log = lambda m: print(m, flush=True)
    t0 = time.time()
    if a.cmd == 'build':
        TASKS_DIR[0] = a.tasks
        build(a.out, a.steps, a.cache, print_log)
    elif a.cmd == 'base':
        r = trial_recipe(a)
        cfg = model_config(**r['model'])
        log(f'BASE {json.dumps(base_key(r))}')
        W = train_base(cfg, r['base'], r['seed'], log)
        save(W, cfg, a.out, base_key(r))
        log(f'base done {time.time() - t0:.0f}s')
        acc = scores(W, cfg)
        rr = random.Random(99)
        ow = {}
        for _, t in TASKS:
            ex = [dict(zip(('prompt', 'answer'), other(t, rr, r['base']['wording']))) for _ in range(200)]
            ow[t] = accuracy(W, cfg, ex)
        log(f'base test acc {json.dumps(acc)} other-wording acc {json.dumps(ow)} {time.time() - t0:.0f}s')
    elif a.cmd == 'finetune':
        W, cfg, meta = load(a.base)
        r = json.loads(json.dumps(RECIPE))
        r.update(seed=meta['seed'], model=meta['model'], base=meta['base'], finetuneBatch=a.batch, finetuneWarmup=a.warmup)
        r['finetunes'][a.domain] = dict(steps=a.steps, lr=a.lr, prox=a.prox)
        log(f'FT {json.dumps(finetune_key(r, a.domain))}')
        Wf = train_finetune(W, cfg, a.domain, r['finetunes'][a.domain], a.batch, a.warmup)
        save(Wf, cfg, a.out, finetune_key(r, a.domain))
        acc = scores(Wf, cfg)
        log(f'FT {a.domain} -> {a.out} acc {json.dumps(acc)} |d|/|W| {relative_norm(Wf, W):.4f} {time.time() - t0:.0f}s')
    elif a.cmd == 'eval':
        W, cfg, _ = load(a.base)
        fts = {d: load(p)[0] for d, p in zip(DOMAINS, a.ft)}
        deltas = {d: {n: fts[d][n] - W[n] for n in W} for d in DOMAINS}
        ref = {d: scores(fts[d], cfg, a.split) for d in DOMAINS}
        def merged(ds):
            return {n: W[n] + sum(d[n] for d in ds) for n in W}
        acc = scores(merged(deltas.values()), cfg, a.split)
        res = {'dense': {d: round(domain_ratio(acc, ref[d], d), 3) for d in DOMAINS}}
        for m in ('magnitude', 'dare'):
            res[m + '1'] = {}
            for d in DOMAINS:
                acc1 = scores(merged([prune(deltas[d], m, 0.9)]), cfg, a.split)
                res[m + '1'][d] = round(domain_ratio(acc1, ref[d], d), 3)
        log(f'EVAL {a.ft} {json.dumps(res)} {time.time() - t0:.0f}s')


if __name__ == '__main__':
    main()
