"""Greedy decoding with a KV cache (qkv.flash_attn_with_kvcache) for a small grouped-query-attention
decoder, against recomputing the whole prefix for every new token; prints per-token latency.

    python examples/kvcache/decode.py                         # batch 4, prompt 256, 64 new tokens
    python examples/kvcache/decode.py --prompt 1024 --new 32
    python examples/kvcache/decode.py --smoke                 # seconds; exits non-zero on a mismatch

The model has random weights (the point is the decoding loop, not the text): token and position
embeddings, pre-RMSNorm blocks of attention (8 query heads sharing 2 key/value heads) and an MLP.

- cached: the prompt is run once (prefill), writing its keys/values into preallocated caches
  (batch, max_len, kv_heads, head_dim); each new token then projects only itself, and
  flash_attn_with_kvcache appends its key/value at row cache_seqlens and attends over the cache.
  Cost per token: O(prefix) in attention, O(1) in everything else.
- recompute: each new token runs the model over the whole prefix (qkv.flash_attn_func, causal),
  what decoding without a cache does. Cost per token: O(prefix) projections and MLP, O(prefix^2)
  attention.

Both paths are fed the same tokens; the script checks that every step's logits agree.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

import qkv


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    parser.add_argument("--new", type=int, default=64, help="tokens to generate")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.prompt, args.new, args.dim, args.layers = 2, 32, 8, 64, 2
        args.threads = args.threads or 1
    return args


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)  # GQA: fewer key/value heads
        self.out = nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def project(self, x: torch.Tensor):
        """x (B, T, dim) -> q (B, T, heads, head_dim), k and v (B, T, kv_heads, head_dim): the
        flash-attn layout, a view of the projections."""
        b, t, _ = x.shape
        h = self.norm1(x)
        k, v = self.kv(h).view(b, t, 2, self.kv_heads, self.head_dim).unbind(2)
        return self.q(h).view(b, t, self.heads, self.head_dim), k, v

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        x = x + self.out(attn.flatten(2))
        return x + self.mlp(self.norm2(x))

    def forward_full(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project(x)
        return self.finish(x, qkv.flash_attn_func(q, k, v, causal=True))

    def forward_cached(self, x: torch.Tensor, k_cache, v_cache, cache_seqlens: torch.Tensor) -> torch.Tensor:
        """x holds the tokens after the cache_seqlens[b] cached ones; their keys/values are appended."""
        q, k, v = self.project(x)
        attn = qkv.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens, causal=True)
        return self.finish(x, attn)


class Decoder(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, kv_heads: int, max_len: int):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads) for _ in range(layers))
        self.norm, self.head = nn.RMSNorm(dim), nn.Linear(dim, vocab, bias=False)
        self.max_len = max_len

    def new_caches(self, batch: int):
        blk = self.blocks[0]
        shape = (batch, self.max_len, blk.kv_heads, blk.head_dim)
        return [(torch.zeros(shape), torch.zeros(shape)) for _ in self.blocks]

    def logits_full(self, ids: torch.Tensor) -> torch.Tensor:
        """Last position's logits, computed over the whole prefix (no cache)."""
        x = self.embed(ids) + self.pos(torch.arange(ids.size(1)))
        for blk in self.blocks:
            x = blk.forward_full(x)
        return self.head(self.norm(x[:, -1]))

    def logits_cached(self, ids: torch.Tensor, start: int, caches) -> torch.Tensor:
        """Last position's logits for ids (the tokens at positions start..), extending the caches."""
        seqlens = torch.full((ids.size(0),), start, dtype=torch.int32)
        x = self.embed(ids) + self.pos(torch.arange(start, start + ids.size(1)))
        for blk, (k_cache, v_cache) in zip(self.blocks, caches):
            x = blk.forward_cached(x, k_cache, v_cache, seqlens)
        return self.head(self.norm(x[:, -1]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = Decoder(args.vocab, args.dim, args.layers, args.heads, args.kv_heads, args.prompt + args.new).eval()
    prompt = torch.randint(0, args.vocab, (args.batch, args.prompt))
    print(f"batch {args.batch}, prompt {args.prompt}, {args.new} new tokens; {args.layers} layers, "
          f"{args.heads} query heads sharing {args.kv_heads} key/value heads of {args.dim // args.heads}; "
          f"threads={torch.get_num_threads()}")

    with torch.inference_mode():
        caches = model.new_caches(args.batch)
        started = time.perf_counter()
        logits = model.logits_cached(prompt, 0, caches)  # prefill
        prefill_s = time.perf_counter() - started
        tokens, cached_logits, cached_ms = prompt, [], []
        for i in range(args.new):
            cached_logits.append(logits)
            nxt = logits.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
            started = time.perf_counter()
            logits = model.logits_cached(nxt, tokens.size(1) - 1, caches)
            cached_ms.append(1e3 * (time.perf_counter() - started))

        recompute_ms, worst = [], 0.0
        for i in range(args.new):
            prefix = tokens[:, : args.prompt + i]
            started = time.perf_counter()
            logits = model.logits_full(prefix)
            recompute_ms.append(1e3 * (time.perf_counter() - started))
            worst = max(worst, (logits - cached_logits[i]).abs().max().item())

    def med(xs):
        return statistics.median(xs)

    quarter = max(1, args.new // 4)
    print(f"prefill of {args.prompt} tokens: {1e3 * prefill_s:.1f} ms")
    print(f"{'per-token latency (ms)':<28}{'cached':>10}{'recompute':>12}{'ratio':>8}")
    for label, sl in ((f"first {quarter} tokens", slice(0, quarter)), (f"last {quarter} tokens", slice(-quarter, None)),
                      (f"all {args.new} tokens", slice(None))):
        c, r = med(cached_ms[sl]), med(recompute_ms[sl])
        print(f"{label + ' (median)':<28}{c:>10.2f}{r:>12.2f}{r / c:>7.1f}x")
    print(f"summary: {args.new} tokens, cached {med(cached_ms):.2f} ms/token, recompute {med(recompute_ms):.2f} "
          f"ms/token, max |logit difference| {worst:.2e}")
    if worst > 1e-3:
        print("FAILED: the cached and recomputed logits differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
