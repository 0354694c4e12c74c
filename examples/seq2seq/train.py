"""Train a small encoder-decoder Transformer built from qkv layers on a generated digit task.

    python examples/seq2seq/train.py                       # qkv attention, full run
    python examples/seq2seq/train.py --attention torch     # same model on torch's MultiheadAttention
    python examples/seq2seq/train.py --smoke               # seconds; exits non-zero unless the loss falls
    torchrun --nproc_per_node=2 examples/seq2seq/train.py  # DistributedDataParallel (gloo on CPU, NCCL on GPU)

The task (default: reverse a digit sequence of length 1..10) is generated from a seed, so
every run, backend and process sees the same data. Accuracy is exact-sequence accuracy of
greedy decoding on held-out sequences that never occur in training.
"""
from __future__ import annotations

import argparse
import functools
import math
import sys
import time

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import distributed
from attention import BACKENDS, attention_layers
from data import PAD, TASKS, VOCAB_SIZE, SequencePairs, train_test_split
from model import Seq2SeqTransformer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attention", choices=BACKENDS, default="qkv", help="attention implementation")
    parser.add_argument("--task", choices=TASKS, default="reverse")
    parser.add_argument("--min-len", type=int, default=1)
    parser.add_argument("--max-len", type=int, default=10)
    parser.add_argument("--train-size", type=int, default=50_000)
    parser.add_argument("--test-size", type=int, default=2_000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch, split over processes")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2, help="encoder layers, and as many decoder layers")
    parser.add_argument("--hidden-dim", type=int, default=256, help="feed-forward width")
    parser.add_argument("--dropout", type=float, default=0.0, help="on embeddings, residual branches, feed-forward")
    parser.add_argument(
        "--attn-dropout", type=float, default=0.0,
        help="on attention probabilities; qkv and torch draw different random masks, so with this > 0 "
        "the two backends' losses differ from the first step",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--log-every", type=int, default=50, help="steps between progress lines")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--smoke", action="store_true", help="tiny run that checks the loss falls (seconds)")
    args = parser.parse_args(argv)
    if args.smoke:
        # Tiny everything; enough steps for a clear fall of the loss, checked in main().
        args.max_len, args.train_size, args.test_size = 5, 1024, 64
        args.epochs, args.batch_size, args.max_steps, args.log_every = 5, 32, 150, 25
        args.embed_dim, args.num_heads, args.layers, args.hidden_dim = 32, 2, 1, 64
        args.warmup_steps, args.lr = 5, 5e-3
        args.threads = args.threads or 1  # tiny matrices: threading costs more than it gives
    return args


def sequence_loss(model: nn.Module, batch: SequencePairs, global_target_tokens: int, world_size: int) -> torch.Tensor:
    """Cross-entropy summed over this process's target tokens, scaled so that DDP's gradient
    average equals the gradient of the mean over the whole global batch's tokens (exactly,
    even when processes hold different numbers of non-pad tokens)."""
    logits = model(batch.src, batch.tgt_in)
    total = nn.functional.cross_entropy(
        logits.flatten(0, 1), batch.tgt_out.flatten(), ignore_index=PAD, reduction="sum"
    )
    return total * (world_size / global_target_tokens)


def exact_match_accuracy(
    model: Seq2SeqTransformer, test: SequencePairs, batch_size: int, context: distributed.DistributedContext
) -> float:
    """Fraction of held-out sequences whose greedy decoding equals the target up to and including EOS."""
    model.eval()
    shard = test[context.rank :: context.world_size].to(context.device)
    correct = 0
    for start in range(0, len(shard), batch_size):
        batch = shard[start : start + batch_size]
        predicted = model.greedy_decode(batch.src, max_steps=batch.tgt_out.shape[1])
        relevant = batch.tgt_out != PAD
        correct += int(((predicted == batch.tgt_out) | ~relevant).all(dim=1).sum())
    model.train()
    correct, total = distributed.all_reduce_sum([float(correct), float(len(shard))], context)
    return correct / total


def warmup_then_cosine(warmup_steps: int, total_steps: int):
    """Learning-rate factor: linear warm-up, then cosine decay to 5% of the peak."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def loss_fell(losses: list[float], window: int = 5, ratio: float = 0.8) -> bool:
    """True when the mean of the last `window` losses is below `ratio` x the mean of the first."""
    if len(losses) < 2 * window:
        return False
    return sum(losses[-window:]) / window < ratio * sum(losses[:window]) / window


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    context = distributed.setup(args.device)
    log = functools.partial(print, flush=True) if context.is_main else (lambda *a, **k: None)

    train_set, test_set = train_test_split(
        args.train_size, args.test_size, args.min_len, args.max_len, args.task, seed=args.seed
    )
    # Same seed in every process and for both backends: identical initial weights.
    torch.manual_seed(args.seed)
    model = Seq2SeqTransformer(
        attention_layers(args.attention),
        VOCAB_SIZE,
        embed_dim=args.embed_dim,
        num_heads=args.num_heads,
        num_encoder_layers=args.layers,
        num_decoder_layers=args.layers,
        hidden_dim=args.hidden_dim,
        dropout=args.dropout,
        attn_dropout=args.attn_dropout,
        max_len=args.max_len + 1,
    ).to(context.device)
    # Dropout should differ between processes (they see different examples).
    torch.manual_seed(args.seed + 1000 * context.rank)
    trained = DistributedDataParallel(model) if context.distributed else model

    steps_per_epoch = math.ceil(len(train_set) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_cosine(args.warmup_steps, total_steps))

    log(
        f"seq2seq {args.task}: attention={args.attention} device={context.device} processes={context.world_size} "
        f"params={sum(p.numel() for p in model.parameters()):,} train={len(train_set):,} test={len(test_set):,} "
        f"steps={total_steps}"
    )
    losses: list[float] = []
    epoch_seconds: list[float] = []
    # CPU seconds of this process as well as wall seconds: on a shared machine wall time
    # measures the neighbours too.
    epoch_cpu_seconds: list[float] = []
    step = 0
    window_tokens, window_start = 0, time.perf_counter()
    while step < total_steps:
        epoch = len(epoch_seconds)
        epoch_start, epoch_cpu_start = time.perf_counter(), time.process_time()
        # Every process draws the same permutation and takes its own slice of each global batch.
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed + epoch))
        for start in range(0, len(order), args.batch_size):
            if step >= total_steps:
                break
            global_batch = train_set[order[start : start + args.batch_size]]
            if len(global_batch) < context.world_size:
                break  # a last scrap too small to give every process an example
            target_tokens = int((global_batch.tgt_out != PAD).sum())
            local = global_batch[torch.tensor_split(torch.arange(len(global_batch)), context.world_size)[context.rank]]
            local = local.to(context.device)

            loss = sequence_loss(trained, local, target_tokens, context.world_size)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()

            # The global mean loss, for the log (one small all-reduce per step).
            losses.append(distributed.all_reduce_sum([loss.item()], context)[0] / context.world_size)
            window_tokens += int((global_batch.src != PAD).sum()) + target_tokens
            step += 1
            if step % args.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - window_start
                log(f"step {step:5d}  epoch {epoch}  loss {losses[-1]:.4f}  tokens/s {window_tokens / elapsed:,.0f}")
                window_tokens, window_start = 0, time.perf_counter()
        epoch_seconds.append(time.perf_counter() - epoch_start)
        epoch_cpu_seconds.append(time.process_time() - epoch_cpu_start)

    accuracy = exact_match_accuracy(model, test_set, batch_size=256, context=context)
    # A run cut short by --max-steps has a partial last epoch: leave it out of the average.
    whole = len(epoch_seconds) if args.max_steps is None or len(epoch_seconds) == 1 else len(epoch_seconds) - 1
    log(
        f"summary: attention={args.attention} exact-sequence accuracy {accuracy:.2%} on {len(test_set):,} held-out "
        f"sequences | time/epoch {sum(epoch_seconds[:whole]) / whole:.1f}s wall, "
        f"{sum(epoch_cpu_seconds[:whole]) / whole:.1f}s CPU (this process) | total {sum(epoch_seconds):.1f}s | "
        f"first step losses {', '.join(f'{v:.4f}' for v in losses[:3])} | final loss {losses[-1]:.4f}"
    )
    distributed.teardown(context)

    if args.smoke and not loss_fell(losses):
        log(f"smoke FAILED: the loss did not fall (first {losses[:5]}, last {losses[-5:]})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
