"""Train a small Hugging Face transformers causal LM (Llama or Mistral, grouped-query attention)
on qkv's attention, on the CPU, from random weights.

    python examples/transformers/train.py                       # Llama, attn_implementation="qkv"
    python examples/transformers/train.py --attention sdpa      # the same model on torch's SDPA
    python examples/transformers/train.py --model mistral       # sliding window of 16 tokens
    python examples/transformers/train.py --smoke               # seconds; exits non-zero unless the loss falls

Needs transformers (make's venv has the pinned version). No download: the model is built with
AutoModelForCausalLM.from_config, and the data are generated: each sequence is an arithmetic
pattern of 2 to 6 distinct random tokens repeated to the end, right-padded to random lengths: after
the first period every token can be read off the previous occurrence of the token before it (the
"induction" two attention layers learn), and the batches carry padding masks.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import qkv.integrations.transformers as qkv_transformers

VOCAB = 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attention", choices=("qkv", "sdpa", "eager"), default="qkv",
                        help="transformers attn_implementation")
    parser.add_argument("--model", choices=("llama", "mistral"), default="llama")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=48)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--smoke", action="store_true", help="tiny run that checks the loss falls (seconds)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size, args.seq_len, args.log_every = 100, 32, 24, 10
        args.threads = args.threads or 1
    return args


def build_config(args: argparse.Namespace):
    from transformers import LlamaConfig, MistralConfig

    common = dict(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                  num_hidden_layers=args.layers, num_attention_heads=args.heads,
                  num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq_len)
    if args.model == "mistral":
        return MistralConfig(**common, sliding_window=min(16, args.seq_len - 1))
    return LlamaConfig(**common)


def make_batch(args: argparse.Namespace, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask): periodic sequences (a pattern of 2..6 distinct tokens repeated),
    right-padded with 0 to lengths between half and all of seq_len."""
    b, s = args.batch_size, args.seq_len
    patterns = torch.rand(b, VOCAB, generator=generator).argsort(dim=1)[:, :6]
    period = torch.randint(2, 7, (b, 1), generator=generator)
    ids = patterns.gather(1, torch.arange(s) % period)
    lengths = torch.randint(s // 2, s + 1, (b, 1), generator=generator)
    mask = (torch.arange(s) < lengths).long()
    return ids * mask, mask


def loss_fell(losses: list[float]) -> bool:
    k = max(1, len(losses) // 6)
    return sum(losses[-k:]) / k < 0.85 * sum(losses[:k]) / k  # the first win: tokens seen earlier in the sequence


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    qkv_transformers.register()
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(build_config(args), attn_implementation=args.attention)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {n_params:,} parameters, {args.heads} query heads, {args.kv_heads} key/value heads, "
          f"attn_implementation={model.config._attn_implementation}, threads={torch.get_num_threads()}")

    losses, tokens, started = [], 0, time.perf_counter()
    for step in range(1, args.steps + 1):
        ids, mask = make_batch(args, generator)
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        tokens += int(mask.sum())
        if step % args.log_every == 0 or step == 1:
            elapsed = time.perf_counter() - started
            print(f"step {step:4d}  loss {losses[-1]:.4f}  {tokens / elapsed:,.0f} tokens/s", flush=True)

    elapsed = time.perf_counter() - started
    print(f"summary: attention={args.attention} model={args.model} steps={args.steps} in {elapsed:.1f} s | "
          f"first step losses {', '.join(f'{v:.4f}' for v in losses[:3])} | final loss {losses[-1]:.4f}")
    if args.smoke and not loss_fell(losses):
        print(f"smoke FAILED: the loss did not fall ({losses[0]:.4f} -> {losses[-1]:.4f})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
