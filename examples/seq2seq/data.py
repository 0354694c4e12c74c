"""Generated sequence-to-sequence tasks on digit strings of varying length.

Every sequence is right-padded with PAD, so the model sees real key-padding masks. Token ids:
PAD=0, BOS=1, EOS=2 and digit d -> d + 3.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PAD, BOS, EOS = 0, 1, 2
NUM_DIGITS = 10
VOCAB_SIZE = 3 + NUM_DIGITS
TASKS = ("reverse", "sort")


@dataclass
class SequencePairs:
    """A set of (source, target) pairs, padded to fixed widths.

    src:     (N, max_len + 1) the digits, EOS, then PAD (EOS marks the end, an anchor for
                              position-from-the-end, which reversing needs)
    tgt_in:  (N, max_len + 1) BOS, the target digits, then PAD  (decoder input, teacher forcing)
    tgt_out: (N, max_len + 1) the target digits, EOS, then PAD   (what the decoder must predict)
    """

    src: torch.Tensor
    tgt_in: torch.Tensor
    tgt_out: torch.Tensor

    def __len__(self) -> int:
        return self.src.shape[0]

    def __getitem__(self, index: torch.Tensor | slice) -> "SequencePairs":
        return SequencePairs(self.src[index], self.tgt_in[index], self.tgt_out[index])

    def to(self, device: torch.device | str) -> "SequencePairs":
        return SequencePairs(self.src.to(device), self.tgt_in.to(device), self.tgt_out.to(device))


def _targets(digits: torch.Tensor, lengths: torch.Tensor, task: str) -> torch.Tensor:
    """The target digit rows (same padding as `digits`, pads hold any value)."""
    positions = torch.arange(digits.shape[1])
    if task == "reverse":
        # Position i of the output reads position len - 1 - i of the input.
        index = (lengths[:, None] - 1 - positions).clamp(min=0)
        return digits.gather(1, index)
    if task == "sort":
        # Pads sort last once they are pushed above every digit.
        padded = digits.masked_fill(positions >= lengths[:, None], NUM_DIGITS)
        return padded.sort(dim=1).values
    raise ValueError(f"task must be one of {TASKS}; got {task!r}")


def generate_pairs(num: int, min_len: int, max_len: int, task: str, generator: torch.Generator) -> SequencePairs:
    """`num` random digit sequences with lengths uniform in [min_len, max_len] and their targets."""
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len; got min_len={min_len}, max_len={max_len}")
    lengths = torch.randint(min_len, max_len + 1, (num,), generator=generator)
    digits = torch.randint(0, NUM_DIGITS, (num, max_len), generator=generator)
    targets = _targets(digits, lengths, task)

    positions = torch.arange(max_len)
    is_pad = positions >= lengths[:, None]
    body = (targets + 3).masked_fill(is_pad, PAD)
    src = torch.full((num, max_len + 1), PAD, dtype=torch.long)
    src[:, :max_len] = (digits + 3).masked_fill(is_pad, PAD)
    src[torch.arange(num), lengths] = EOS

    tgt_in = torch.full((num, max_len + 1), PAD, dtype=torch.long)
    tgt_in[:, 0] = BOS
    tgt_in[:, 1:] = body
    tgt_out = torch.full((num, max_len + 1), PAD, dtype=torch.long)
    tgt_out[:, :max_len] = body
    tgt_out[torch.arange(num), lengths] = EOS
    return SequencePairs(src, tgt_in, tgt_out)


def train_test_split(
    num_train: int, num_test: int, min_len: int, max_len: int, task: str, seed: int
) -> tuple[SequencePairs, SequencePairs]:
    """A training set and a held-out test set that shares no source sequence with it."""
    generator = torch.Generator().manual_seed(seed)
    train = generate_pairs(num_train, min_len, max_len, task, generator)
    seen = {row.tobytes() for row in train.src.numpy()}
    # Draw spares so that dropping the (rare, for long sequences) overlaps still leaves num_test.
    candidates = generate_pairs(2 * num_test + 64, min_len, max_len, task, generator)
    fresh = [i for i, row in enumerate(candidates.src.numpy()) if row.tobytes() not in seen]
    if len(fresh) < num_test:
        raise ValueError(
            f"only {len(fresh)} held-out sequences are unseen in training; use longer sequences or fewer examples"
        )
    return train, candidates[torch.tensor(fresh[:num_test])]
