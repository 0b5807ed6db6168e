"""A character-level Transformer language model on the Python standard library's own source,
with its attention picked by one flag.  One file, read top to bottom: configuration, data,
model, training loop.

    python examples/char_lm.py --attention routing                      # one process
    torchrun --nproc-per-node 2 examples/char_lm.py --ddp --attention routing   # DDP, gloo
    python examples/char_lm.py --attention local --sample 200           # then generate

Attention (every one masks the keys after the query):
    sdpa              torch.nn.functional.scaled_dot_product_attention (the reference)
    dense             routing_attention.torch.attention (ours, exact)
    local             routing_attention.torch.local_attention, window --window
    routing           routing_attention.torch.RoutingAttention: half the heads routing
                      (--clusters clusters of --window members), half local (--window)
    combiner-fixed    routing_attention.torch.combiner_attention, plan "fixed"
    combiner-axial    ... plan "axial"
    combiner-mixture  ... plan "mixture"
    rt-lucidrains     the routing-transformer package's KmeansAttention on half the heads and
                      local-attention's LocalAttention on the other half (the peer of `routing`)

Causality: every method masks keys after the query, but balanced routing membership (the
default, as in the paper and in rt-lucidrains) picks each cluster's members from the whole
window, so later bytes change which earlier keys a query meets: its predictions are not
strictly causal.  `--membership argmax` is (for the centroids of the moment).

DDP: the global batch is drawn per step from (seed, step) and split between the processes,
gradients are averaged, so a run matches the single process up to float rounding.  Not
for `routing` / `rt-lucidrains`: each process fits its first centroids on its own share of
the batch, and DDP then copies rank 0's centroid buffer to every process at each forward
(moved by rank 0's share only), so those curves are statistically alike, not equal.

Data: every `*.py` file of the running interpreter's standard library (site-packages left
out), sorted by path; every 10th file is held out for validation.  Bytes, vocabulary 256.
"""
import argparse
import gc
import json
import math
import os
import pathlib
import resource
import statistics
import sys
import sysconfig
import time
import functools
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import routing_attention.torch as rt
    from routing_attention.pairs import alibi_slopes
except ImportError:             # only `--attention sdpa` works without the bridge
    rt = None

ATTENTIONS = ("sdpa", "dense", "local", "routing", "combiner-fixed", "combiner-axial",
              "combiner-mixture", "rt-lucidrains")


# ----------------------------------------------------------------------------- configuration
def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--attention", choices=ATTENTIONS, default="routing")
    # model
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--context", type=int, default=2048, help="training window, in bytes")
    p.add_argument("--window", type=int, default=128,
                   help="local attention block; also the routing cluster size")
    p.add_argument("--clusters", type=int, default=None,
                   help="routing clusters per head (default context // window)")
    p.add_argument("--shared-qk", action="store_true",
                   help="routing / rt-lucidrains: keys are the normalised queries")
    p.add_argument("--membership", choices=("balanced", "argmax"), default="balanced",
                   help="routing: each cluster takes its --window nearest tokens (balanced, "
                        "the paper's and rt-lucidrains'; NOT strictly causal: later bytes "
                        "decide which earlier keys a query meets) or each token its nearest "
                        "centroid (argmax: causal for given centroids)")
    p.add_argument("--block", type=int, default=None,
                   help="combiner block / grid width (default ceil(sqrt(context)))")
    p.add_argument("--attn-dropout", type=float, default=0.0,
                   help="attention dropout while training (the Routing Transformer's enwik8 "
                        "model uses 0.4); not with rt-lucidrains")
    p.add_argument("--position-bias", choices=("none", "alibi", "t5"), default="none",
                   help="relative position bias in the attention logits: ALiBi slopes, or a "
                        "learned causal T5 bucket table per head (32 buckets, max distance "
                        "128); not with rt-lucidrains")
    p.add_argument("--aux-weight", type=float, default=1e-4,
                   help="weight of the routing commitment loss")
    # training
    p.add_argument("--batch-size", type=int, default=4, help="global batch (all processes)")
    p.add_argument("--steps", type=int, default=1500, help="length of the lr schedule")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this step (default --steps); resume later with --resume")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--threads", type=int, default=None,
                   help="torch (and kernel) threads per process (default: cores / processes)")
    p.add_argument("--ddp", action="store_true", help="run under torchrun (gloo backend)")
    # evaluation, logging, checkpoints
    p.add_argument("--eval-every", type=int, default=100, help="0: only at the end")
    p.add_argument("--eval-windows", type=int, default=16,
                   help="fixed held-out windows of --context bytes")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--log-json", default=None, help="write the run's record here")
    p.add_argument("--ckpt", default=None, help="save a checkpoint here (every --ckpt-every "
                                                 "steps and at the end)")
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--resume", default=None, help="continue from this checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--sample", type=int, default=0, metavar="N",
                   help="after training, generate N bytes (greedy) with the decoding caches "
                        "and time it against recomputing the whole forward per byte")
    p.add_argument("--prompt", default="def ", help="the bytes generation starts from")
    args = p.parse_args(argv)
    if args.clusters is None:
        args.clusters = max(1, args.context // args.window)
    if args.stop_after is None:
        args.stop_after = args.steps
    if args.d_model % args.heads:
        p.error(f"--d-model ({args.d_model}) must be a multiple of --heads ({args.heads})")
    return args


# ----------------------------------------------------------------------------- data
@lru_cache(maxsize=None)
def load_corpus():
    """(train bytes, held-out bytes, file counts): the standard library's *.py files sorted by
    path, every 10th (index 9, 19, ...) held out, each split concatenated in order."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts))
    if not files:
        raise RuntimeError(f"no *.py files under the standard library folder {root}")
    train, val = bytearray(), bytearray()
    for i, path in enumerate(files):
        (val if i % 10 == 9 else train).extend(path.read_bytes())
    n_val = len(files) // 10
    as_tensor = lambda b: torch.frombuffer(b, dtype=torch.uint8)
    return as_tensor(train), as_tensor(val), (len(files) - n_val, n_val), str(root)


def get_batch(data, step, args, rank=0, world=1):
    """This process's share of step `step`'s global batch: random windows drawn by a
    generator seeded with (seed, step), so a run is the same however it is split into
    processes or interrupted.  Returns inputs x and next-byte targets y, (B / world, T)."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    starts = torch.randint(len(data) - args.context - 1, (args.batch_size,), generator=g)
    starts = starts.chunk(world)[rank]
    offsets = torch.arange(args.context + 1)
    xy = data[starts[:, None] + offsets].long()
    return xy[:, :-1], xy[:, 1:]


def eval_windows(data, args):
    """Start offsets of the fixed held-out windows: evenly spaced over the held-out text."""
    return torch.linspace(0, len(data) - args.context - 1, args.eval_windows).long()


# ----------------------------------------------------------------------------- attention
# Each module maps q, k, v of shape (B, H, T, head_dim) to the output of that shape and keeps
# in `aux_loss` the auxiliary loss of its last call (0 for the methods without one).
# `dropout_p` and `rel_bias` (H, 2T - 1) are the attention dropout of this call (0 in eval
# mode) and the relative position bias (None without --position-bias).
class SDPA(nn.Module):
    aux_loss = 0.0

    def forward(self, q, k, v, dropout_p=0.0, rel_bias=None):
        if rel_bias is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        T = q.shape[-2]
        offset = torch.arange(T)[None, :] - torch.arange(T)[:, None]      # j - i
        logits_bias = rel_bias[..., offset + T - 1]
        mask = logits_bias.masked_fill(offset > 0, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class Dense(nn.Module):
    aux_loss = 0.0

    def forward(self, q, k, v, dropout_p=0.0, rel_bias=None):
        return rt.attention(q, k, v, causal=True, dropout_p=dropout_p, rel_bias=rel_bias)


class Local(nn.Module):
    aux_loss = 0.0

    def __init__(self, window):
        super().__init__()
        self.window = window

    def forward(self, q, k, v, dropout_p=0.0, rel_bias=None):
        return rt.local_attention(q, k, v, self.window, causal=True, dropout_p=dropout_p,
                                  rel_bias=rel_bias)


class Combiner(nn.Module):
    aux_loss = 0.0

    def __init__(self, plan, block):
        super().__init__()
        self.plan, self.block = plan, block

    def forward(self, q, k, v, dropout_p=0.0, rel_bias=None):
        # a block longer than the sequence means one block (generation's short prefixes)
        block = None if self.block is None else min(self.block, q.shape[-2])
        return rt.combiner_attention(q, k, v, plan=self.plan, block=block, causal=True,
                                     dropout_p=dropout_p, rel_bias=rel_bias)


class Routing(nn.Module):
    """The paper's mix: the first half of the heads local, the rest routing."""

    def __init__(self, args):
        super().__init__()
        self.layer = rt.RoutingAttention(args.clusters, local_heads=args.heads // 2,
                                         window=args.window, shared_qk=args.shared_qk,
                                         causal=True, membership=args.membership,
                                         seed=args.seed, dropout=args.attn_dropout)
        self.aux_loss = 0.0

    def forward(self, q, k, v, dropout_p=0.0, rel_bias=None):
        out = self.layer(q, k, v, rel_bias=rel_bias)    # dropout: the layer's, while training
        self.aux_loss = self.layer.commitment_loss
        return out


class Lucidrains(nn.Module):
    """The peer: local-attention's LocalAttention on the first half of the heads and
    routing-transformer's KmeansAttention (balanced top-w clusters, EMA centroids) on the
    rest, as routing-transformer's own SelfAttention combines them."""

    def __init__(self, args):
        super().__init__()
        from local_attention import LocalAttention
        from routing_transformer.routing_transformer import KmeansAttention
        self.local_heads = args.heads // 2
        self.local = LocalAttention(args.window, causal=True, look_backward=1,
                                    shared_qk=args.shared_qk)
        self.routing = KmeansAttention(args.clusters, args.window, args.heads - self.local_heads,
                                       args.d_model // args.heads, causal=True,
                                       commitment=1.0, shared_qk=args.shared_qk)
        # commitment=1.0: its loss (mean squared distance per element) is weighted by
        # --aux-weight like ours (mean squared distance per row, so d times larger)
        self.aux_loss = 0.0

    def forward(self, q, k, v, dropout_p=0.0, rel_bias=None):     # both refused by make_attention
        h = self.local_heads
        local = self.local(q[:, :h], k[:, :h], v[:, :h])
        routed, self.aux_loss = self.routing(q[:, h:], k[:, h:], v[:, h:])
        return torch.cat((local, routed), dim=1)

    @torch.no_grad()
    def update_centroids(self):
        """routing-transformer moves its centroids after the backward (its own models do it
        from a backward hook); the training loop calls this after each backward."""
        if self.routing.kmeans.new_means is not None:
            self.routing.kmeans.update()


def make_attention(args):
    if args.attention == "sdpa":
        return SDPA()
    if (args.attn_dropout or args.position_bias != "none") and args.attention == "rt-lucidrains":
        raise SystemExit("--attention rt-lucidrains takes no --attn-dropout or --position-bias")
    if rt is None:
        raise RuntimeError(f"--attention {args.attention} needs routing_attention.torch "
                           "(pip install -e '.[torch]')")
    if args.attention == "dense":
        return Dense()
    if args.attention == "local":
        return Local(args.window)
    if args.attention == "routing":
        return Routing(args)
    if args.attention.startswith("combiner-"):
        return Combiner(args.attention.removeprefix("combiner-"), args.block)
    return Lucidrains(args)


class AttentionTimer:
    """Seconds spent inside attention during training: the forward is timed around the call;
    the backward from the moment the output's gradient arrives to the moment the gradient of
    the packed q, k, v projection is complete (autograd runs them in sequence on the CPU)."""

    def __init__(self):
        self.seconds = 0.0
        self._start = None

    def __call__(self, attend, q, k, v, qkv):
        if not torch.is_grad_enabled():
            return attend(q, k, v)
        t0 = time.perf_counter()
        out = attend(q, k, v)
        self.seconds += time.perf_counter() - t0
        out.register_hook(self._backward_starts)
        qkv.register_hook(self._backward_ends)
        return out

    def _backward_starts(self, grad):
        self._start = time.perf_counter()

    def _backward_ends(self, grad):
        self.seconds += time.perf_counter() - self._start


TIMER = AttentionTimer()


# ----------------------------------------------------------------------------- model
class SelfAttention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.heads = args.heads
        self.qkv = nn.Linear(args.d_model, 3 * args.d_model, bias=False)
        self.proj = nn.Linear(args.d_model, args.d_model, bias=False)
        self.attend = make_attention(args)
        self.dropout, self.position_bias = args.attn_dropout, args.position_bias
        slopes = alibi_slopes(args.heads) if self.position_bias == "alibi" else []
        self.register_buffer("slopes", torch.tensor(slopes, dtype=torch.float32))
        self.bias_table = (nn.Parameter(torch.zeros(args.heads, 32))
                           if self.position_bias == "t5" else None)

    def rel_bias(self, T):
        """The (H, 2T - 1) relative position bias of a length-T window, or None."""
        if self.position_bias == "none":
            return None
        return rt.relative_bias(T, T, alibi=self.slopes if self.slopes.numel() else None,
                                table=self.bias_table, bidirectional=False)

    def forward(self, x):
        B, T, C = x.shape
        qkv = self.qkv(x)
        q, k, v = qkv.view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attend = functools.partial(self.attend, dropout_p=self.dropout if self.training else 0.0,
                                   rel_bias=self.rel_bias(T))
        y = TIMER(attend, q.contiguous(), k.contiguous(), v.contiguous(), qkv)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-LN Transformer block: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, args):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(args.d_model), nn.LayerNorm(args.d_model)
        self.attn = SelfAttention(args)
        self.mlp = nn.Sequential(nn.Linear(args.d_model, 4 * args.d_model), nn.GELU(),
                                 nn.Linear(4 * args.d_model, args.d_model))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharLM(nn.Module):
    """Byte embedding + learned positions, pre-LN blocks, final LN, tied output layer."""

    def __init__(self, args):
        super().__init__()
        self.tok = nn.Embedding(256, args.d_model)
        self.pos = nn.Embedding(args.context, args.d_model)
        self.blocks = nn.ModuleList(Block(args) for _ in range(args.layers))
        self.ln = nn.LayerNorm(args.d_model)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def logits(self, x):
        """Next-byte logits (B, T, 256) for the bytes x (B, T)."""
        x = self.tok(x) + self.pos(torch.arange(x.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.ln(x) @ self.tok.weight.T

    def forward(self, x, y):
        """(mean cross-entropy in nats, summed auxiliary loss of the attention layers)."""
        loss = F.cross_entropy(self.logits(x).reshape(-1, 256), y.reshape(-1))
        return loss, sum(b.attn.attend.aux_loss for b in self.blocks)


# ----------------------------------------------------------------------------- generation
def make_cache(attend, args):
    """The decoding cache (routing_attention.torch) of one attention module, or None for
    the methods without one (sdpa is decoded with a dense cache: the same attention).  The
    caches take no position bias: with --position-bias, generation recomputes."""
    if args.position_bias != "none":
        return None
    if isinstance(attend, (SDPA, Dense)):
        return rt.DenseCache()
    if isinstance(attend, Local):
        return rt.LocalCache(attend.window)
    if isinstance(attend, Combiner):
        block = attend.block or math.isqrt(args.context - 1) + 1   # the training window's
        return rt.CombinerCache(attend.plan, block=None if attend.plan == "logsparse" else block)
    if isinstance(attend, Routing) and attend.layer.membership == "argmax":
        return rt.RoutingCache(attend.layer)
    return None         # balanced routing (not causal) and rt-lucidrains: no decoding


@torch.no_grad()
def next_logits_cached(model, caches, byte, t):
    """Logits (B, 256) after feeding one byte per sequence (B,) at position t, every layer's
    keys and values appended to its cache: the last row of model.logits over bytes 0..t."""
    x = model.tok(byte) + model.pos.weight[t]
    for block, cache in zip(model.blocks, caches):
        attn, h = block.attn, block.ln1(x)
        B, C = h.shape
        q, k, v = attn.qkv(h).view(B, 3, attn.heads, 1, C // attn.heads).unbind(1)
        y = cache.step(q, k, v)                                  # (B, H, 1, head_dim)
        x = x + attn.proj(y.reshape(B, C))
        x = x + block.mlp(block.ln2(x))
    return model.ln(x) @ model.tok.weight.T


@torch.no_grad()
def generate(model, args, prompt, n):
    """Greedy continuation of `prompt` (bytes) by n bytes, twice: with the decoding caches
    (when every layer has one) and by recomputing the whole forward per byte.  Returns
    {"cached" / "recomputed": (text, seconds)}."""
    model.eval()
    caches = [make_cache(b.attn.attend, args) for b in model.blocks]
    n = min(n, args.context - len(prompt))
    result = {}
    if all(c is not None for c in caches):
        out, t0 = list(prompt), time.perf_counter()
        for t in range(len(prompt) - 1 + n):
            logits = next_logits_cached(model, caches, torch.tensor([out[t]]), t)
            if t >= len(prompt) - 1:
                out.append(int(logits.argmax(-1)))
        result["cached"] = (bytes(out), time.perf_counter() - t0)
    out, t0 = torch.tensor([list(prompt)], dtype=torch.long), time.perf_counter()
    for _ in range(n):
        out = torch.cat([out, model.logits(out)[:, -1].argmax(-1, keepdim=True)], dim=1)
    result["recomputed"] = (bytes(out[0].tolist()), time.perf_counter() - t0)
    return result


# ----------------------------------------------------------------------------- training
def learning_rate(step, args):
    """Linear warm-up, then cosine decay to --min-lr at --steps (step counts from 1)."""
    if step <= args.warmup:
        return args.lr * step / args.warmup
    t = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * t))


def make_optimizer(model, args):
    """AdamW, weight decay on the matrices only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([dict(params=decay, weight_decay=args.weight_decay),
                              dict(params=rest, weight_decay=0.0)],
                             lr=args.lr, betas=(0.9, 0.95))


@torch.no_grad()
def evaluate(model, data, args, rank, world):
    """Held-out bits per character over the fixed windows (each process takes a share)."""
    model.eval()
    starts = eval_windows(data, args).chunk(world)[rank] if world > 1 else eval_windows(data, args)
    total = torch.zeros(2, dtype=torch.float64)      # summed nats, predicted bytes
    offsets = torch.arange(args.context + 1)
    for chunk in starts.split(max(1, args.batch_size // world)):
        xy = data[chunk[:, None] + offsets].long()
        loss, _ = model(xy[:, :-1], xy[:, 1:])
        total += torch.tensor([loss.item() * xy[:, 1:].numel(), xy[:, 1:].numel()],
                              dtype=torch.float64)
    if world > 1:
        torch.distributed.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item() / math.log(2)


def peak_rss_mib():
    """Peak resident set size of this process so far (resource.getrusage ru_maxrss)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10   # bytes / KiB


def main(argv=None):
    args = get_args(argv)
    rank, world = 0, 1
    if args.ddp:
        torch.distributed.init_process_group("gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if args.batch_size % world:
            raise ValueError(f"--batch-size ({args.batch_size}) must be a multiple of the "
                             f"number of processes ({world})")
    master = rank == 0
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)

    train, val, (n_train, n_val), root = load_corpus()
    if master:
        print(f"corpus: {root}/**/*.py, {n_train + n_val} files, {len(train) + len(val):,} bytes"
              f" = train {n_train} files {len(train):,} bytes + held-out {n_val} files "
              f"{len(val):,} bytes (every 10th file)")

    model = CharLM(args).to(dtype)
    if master:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model: {args.layers} layers, d_model {args.d_model}, {args.heads} heads, "
              f"context {args.context}, {n_params:,} parameters, attention {args.attention}, "
              f"{args.dtype}, {world} process(es) x {torch.get_num_threads()} thread(s)")
    optimizer = make_optimizer(model, args)
    record = dict(args=vars(args), corpus=dict(train_files=n_train, val_files=n_val,
                  train_bytes=len(train), val_bytes=len(val)), losses=[], evals=[],
                  step_seconds=[], attention_seconds=[])
    step = 0
    if args.resume:
        ckpt = torch.load(args.resume, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        step, record = ckpt["step"], ckpt["record"]
        record["args"] = vars(args)
        if master:
            print(f"resumed from {args.resume} at step {step}")
    raw_model = model
    if args.ddp:
        model = nn.parallel.DistributedDataParallel(model)
    lucidrains = [m for m in raw_model.modules() if isinstance(m, Lucidrains)]

    def save(path):
        torch.save(dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(),
                        rng=torch.get_rng_state(), step=step, record=record), path)

    def log_eval():
        bpc = evaluate(model, val, args, rank, world)
        record["evals"].append(dict(step=step, train_seconds=sum(record["step_seconds"]),
                                    val_bpc=bpc))
        return bpc

    progress = None
    if master and not args.no_progress:
        try:
            from tqdm import tqdm
            progress = tqdm(total=args.stop_after, initial=step, unit="step", file=sys.stdout,
                            dynamic_ncols=True)
        except ImportError:
            pass
    say = progress.write if progress else print
    tokens_per_step = args.batch_size * args.context
    record.setdefault("rss_before_training_mib", peak_rss_mib())
    model.train()
    while step < args.stop_after:
        step += 1
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        x, y = get_batch(train, step, args, rank, world)
        attention_before = TIMER.seconds
        t0 = time.perf_counter()
        loss, aux = model(x, y)
        (loss + args.aux_weight * aux).backward()
        for m in lucidrains:
            m.update_centroids()
        if args.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record["step_seconds"].append(time.perf_counter() - t0)
        record["attention_seconds"].append(TIMER.seconds - attention_before)
        loss = loss.detach().double()
        if world > 1:
            torch.distributed.all_reduce(loss)
            loss /= world
        record["losses"].append(loss.item())
        if progress:
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}")
        if master and step % args.log_every == 0:
            seconds = record["step_seconds"][-args.log_every:]
            say(f"step {step}: loss {loss.item():.4f} ({loss.item() / math.log(2):.3f} bits/char)"
                f", {tokens_per_step * len(seconds) / sum(seconds):,.0f} tokens/s")
        if (args.eval_every and step % args.eval_every == 0) or step == args.stop_after:
            bpc = log_eval()
            if master:
                say(f"step {step}: held-out {bpc:.4f} bits/char "
                    f"({args.eval_windows} windows of {args.context})")
        if master and args.ckpt and (step % args.ckpt_every == 0 or step == args.stop_after):
            save(args.ckpt)
    if progress:
        progress.close()

    # rates from the median step (robust to other processes' bursts on a shared machine), the
    # first step left out: it pays for allocations and the first k-means
    steps = list(zip(record["step_seconds"], record["attention_seconds"]))[1:] or \
        list(zip(record["step_seconds"], record["attention_seconds"]))
    if steps:
        record["median_step_seconds"] = statistics.median(s for s, _ in steps)
        record["tokens_per_second"] = tokens_per_step / record["median_step_seconds"]
        record["attention_share"] = statistics.median(a / s for s, a in steps)
    record["peak_rss_mib"] = peak_rss_mib()
    if master:
        print(f"done: {step} steps, {record.get('tokens_per_second', 0):,.0f} tokens/s and "
              f"attention {100 * record.get('attention_share', 0):.0f} % of the step (median "
              f"step), peak RSS {record['peak_rss_mib']:.0f} MiB (getrusage maxrss; "
              f"{record['rss_before_training_mib']:.0f} MiB before the first step)")
        if args.sample:
            gen = generate(raw_model, args, args.prompt.encode(), args.sample)
            for how, (text, seconds) in gen.items():
                print(f"generated ({how}, {args.sample / seconds:,.1f} bytes/s): {text!r}")
            if "cached" not in gen:
                print(f"(no decoding cache for --attention {args.attention}"
                      f"{' with balanced membership' if args.attention == 'routing' else ''})")
            record["generation"] = {how: dict(text=text.decode("latin-1"),
                                              bytes_per_second=args.sample / seconds)
                                    for how, (text, seconds) in gen.items()}
        if args.log_json:
            pathlib.Path(args.log_json).write_text(json.dumps(record, indent=1))
    if args.ddp:
        model = None                    # the DDP wrapper, so that its reducer can be collected
        shut_down_ddp()
    return record


def shut_down_ddp():
    """Leave torch.distributed cleanly: both ranks meet at a barrier, the DDP wrapper (whose
    reducer holds the process group) is collected, then the group is destroyed. Without this the
    group's worker threads can outlive the interpreter and abort it at exit (seen once in CI:
    'terminate called without an active exception', SIGABRT after all the work was done)."""
    torch.distributed.barrier()
    gc.collect()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
