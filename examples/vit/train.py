"""Train a small vision transformer built from qkv layers on scikit-learn's 8x8 digits.

    python examples/vit/train.py                      # qkv attention, full run
    python examples/vit/train.py --attention torch    # same model on torch's MultiheadAttention
    python examples/vit/train.py --smoke              # seconds; exits non-zero unless the loss falls

The data set (1,797 images of handwritten digits, 8x8 pixels, 0..16 grey levels) ships inside
scikit-learn: nothing is downloaded. It is split 80/20, stratified, with a fixed seed.
"""
from __future__ import annotations

import argparse
import functools
import sys
import time

import torch
from torch import nn

from attention import BACKENDS, self_attention_layer
from model import POOLINGS, VisionTransformer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attention", choices=BACKENDS, default="qkv", help="attention implementation")
    parser.add_argument("--pool", choices=POOLINGS, default="cls", help="class token or mean of the patches")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--patch-size", type=int, default=2)
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--mlp-dim", type=int, default=128)
    parser.add_argument("--dropout", type=float, default=0.1, help="on residual branches and the MLP")
    parser.add_argument(
        "--attn-dropout", type=float, default=0.0,
        help="on attention probabilities; qkv and torch draw different random masks, so with this > 0 "
        "the two backends' losses differ from the first step",
    )
    parser.add_argument("--no-augment", action="store_true", help="no random 1-pixel shifts of training images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--log-every", type=int, default=10, help="epochs between progress lines")
    parser.add_argument("--smoke", action="store_true", help="tiny run that checks the loss falls (seconds)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.batch_size, args.lr, args.log_every = 6, 32, 1e-2, 1
        args.embed_dim, args.num_heads, args.depth, args.mlp_dim = 32, 2, 1, 64
        args.threads = args.threads or 1  # tiny matrices: threading costs more than it gives
    return args


def load_digits_split(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels); images (N, 1, 8, 8), standardised
    with the training set's mean and standard deviation."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=0.2, stratify=labels.numpy(), random_state=seed
    )
    train_x, test_x = images[train_idx], images[test_idx]
    mean, std = train_x.mean(), train_x.std()
    return (train_x - mean) / std, labels[train_idx], (test_x - mean) / std, labels[test_idx]


def random_shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by -1, 0 or +1 pixel in each direction, the vacated border filled with the
    background value (the minimum). Cheap augmentation that matters with 1,437 training images."""
    n, _, h, w = images.shape
    padded = nn.functional.pad(images, (1, 1, 1, 1), value=float(images.min()))
    dy = torch.randint(0, 3, (n,), generator=generator)
    dx = torch.randint(0, 3, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (n, h, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (n, 1, w)
    return padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None]


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = (model(images).argmax(-1) == labels).sum().item()
    model.train()
    return correct / len(labels)


def loss_fell(losses: list[float], ratio: float = 0.8) -> bool:
    """True when the last epoch's loss is below `ratio` x the first epoch's."""
    return len(losses) >= 2 and losses[-1] < ratio * losses[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    log = functools.partial(print, flush=True)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")

    train_x, train_y, test_x, test_y = load_digits_split(args.seed)
    train_x, train_y, test_x, test_y = (t.to(device) for t in (train_x, train_y, test_x, test_y))
    # Same seed for both backends: identical initial weights.
    torch.manual_seed(args.seed)
    model = VisionTransformer(
        self_attention_layer(args.attention),
        num_classes=10,
        image_size=8,
        patch_size=args.patch_size,
        embed_dim=args.embed_dim,
        num_heads=args.num_heads,
        depth=args.depth,
        mlp_dim=args.mlp_dim,
        dropout=args.dropout,
        attn_dropout=args.attn_dropout,
        pool=args.pool,
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = -(-len(train_y) // args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.1
    )
    data_rng = torch.Generator().manual_seed(args.seed)

    log(
        f"vit digits: attention={args.attention} pool={args.pool} device={device} "
        f"params={sum(p.numel() for p in model.parameters()):,} train={len(train_y)} test={len(test_y)} "
        f"tokens/image={model.patches.num_patches + (args.pool == 'cls')}"
    )
    epoch_losses: list[float] = []
    epoch_seconds: list[float] = []
    # CPU seconds of this process as well as wall seconds: on a shared machine wall time
    # measures the neighbours too.
    epoch_cpu_seconds: list[float] = []
    first_step_losses: list[float] = []
    for epoch in range(1, args.epochs + 1):
        start, cpu_start = time.perf_counter(), time.process_time()
        order = torch.randperm(len(train_y), generator=data_rng).to(device)
        total_loss, correct = 0.0, 0
        for begin in range(0, len(order), args.batch_size):
            index = order[begin : begin + args.batch_size]
            images, labels = train_x[index], train_y[index]
            if not args.no_augment:
                images = random_shift(images.cpu(), data_rng).to(device)
            logits = model(images)
            loss = nn.functional.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if len(first_step_losses) < 3:
                first_step_losses.append(loss.item())
            total_loss += loss.item() * len(labels)
            correct += (logits.argmax(-1) == labels).sum().item()
        epoch_seconds.append(time.perf_counter() - start)
        epoch_cpu_seconds.append(time.process_time() - cpu_start)
        epoch_losses.append(total_loss / len(train_y))
        if epoch % args.log_every == 0 or epoch == args.epochs:
            log(
                f"epoch {epoch:3d}  loss {epoch_losses[-1]:.4f}  train acc {correct / len(train_y):.2%}  "
                f"test acc {accuracy(model, test_x, test_y):.2%}  images/s {len(train_y) / epoch_seconds[-1]:,.0f}"
            )

    test_accuracy = accuracy(model, test_x, test_y)
    log(
        f"summary: attention={args.attention} test accuracy {test_accuracy:.2%} on {len(test_y)} images | "
        f"time/epoch {sum(epoch_seconds) / len(epoch_seconds):.2f}s wall, "
        f"{sum(epoch_cpu_seconds) / len(epoch_cpu_seconds):.2f}s CPU | total {sum(epoch_seconds):.1f}s | "
        f"first step losses {', '.join(f'{v:.4f}' for v in first_step_losses)} | final loss {epoch_losses[-1]:.4f}"
    )
    if args.smoke and not loss_fell(epoch_losses):
        log(f"smoke FAILED: the loss did not fall (per epoch: {epoch_losses})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
