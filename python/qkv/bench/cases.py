"""The benchmark grid: which shapes and settings are compared, and how users pick among them.

A Case is one comparison (one shape, one mode); its sides (qkv and the torch references) are
built by ``workloads``. Grids follow docs/benchmarks.md: the CPU grid fits in about three
minutes on 2 cores, the GPU grid is the FlashAttention convention (16k tokens, H*D = 2048).
"""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, replace

from .flops import attention_flops, projection_flops

CORE_MODES = ("fwd", "bwd", "fwdbwd")
FEATURES = ("", "window", "gqa", "varlen", "kvcache")
# Module modes: training forward+backward with need_weights False / True, and inference.
MODULE_MODES = ("train", "train-weights", "eval")


@dataclass(frozen=True)
class Case:
    """One comparison: a shape and a mode, run by qkv and by each torch reference.

    level "core" compares torch.ops.qkv.attention with F.scaled_dot_product_attention on
    (B, H, L, D) tensors; level "module" compares qkv.MultiheadAttention with
    torch.nn.MultiheadAttention (batch_first, self-attention, E = heads * head_dim).
    """

    name: str
    group: str
    level: str
    mode: str
    batch: int
    heads: int
    q_len: int
    kv_len: int
    head_dim: int
    causal: bool = False
    key_padding: bool = False
    # The sides to compare, qkv first; empty = the level's usual sides (workloads.side_names).
    sides: tuple[str, ...] = ()
    # Thread scaling: when > 0, every side runs at this many threads and again at 1 thread
    # (as "<side>_1t"), interleaved in the same rounds; the result is time(1 thread) / time(n).
    scaling_threads: int = 0
    # Issue 17's features (feature_workloads.py builds their sides): "window" (causal sliding
    # window of `window` keys), "gqa" (`kv_heads` key/value heads), "varlen" (a packed batch whose
    # padded equivalent is half padding), "kvcache" (q_len new tokens against kv_len cached keys,
    # `kv_heads` heads). "" for every other case.
    feature: str = ""
    kv_heads: int = 0  # 0: as many as the query heads
    window: int = 0  # keys a query sees in a "window" case (flash-attn's window_size = (window - 1, 0))

    def __post_init__(self) -> None:
        if self.level not in ("core", "module"):
            raise ValueError(f"Case {self.name}: level must be 'core' or 'module'; got {self.level!r}")
        modes = CORE_MODES if self.level == "core" else MODULE_MODES
        if self.mode not in modes:
            raise ValueError(f"Case {self.name}: mode for level {self.level} must be one of {modes}; got {self.mode!r}")
        if min(self.batch, self.heads, self.q_len, self.kv_len, self.head_dim) < 1:
            raise ValueError(f"Case {self.name}: every dimension must be >= 1")
        if self.level == "module" and self.q_len != self.kv_len:
            raise ValueError(f"Case {self.name}: module cases are self-attention, q_len must equal kv_len")
        if self.sides and self.sides[0] != "qkv":
            raise ValueError(f"Case {self.name}: sides must start with 'qkv'; got {self.sides}")
        if self.scaling_threads < 0 or self.scaling_threads == 1:
            raise ValueError(f"Case {self.name}: scaling_threads must be 0 (off) or >= 2; got {self.scaling_threads}")
        if self.feature not in FEATURES:
            raise ValueError(f"Case {self.name}: feature must be one of {FEATURES}; got {self.feature!r}")
        if self.feature and self.level != "core":
            raise ValueError(f"Case {self.name}: feature cases are core-level")
        if self.kv_heads < 0 or (self.kv_heads and self.heads % self.kv_heads):
            raise ValueError(f"Case {self.name}: kv_heads must divide heads ({self.heads}); got {self.kv_heads}")
        if (self.feature == "window") != (self.window > 0):
            raise ValueError(f"Case {self.name}: window > 0 exactly for feature 'window'; got {self.window}")

    @property
    def family(self) -> str:
        """The grid row a case comes from, e.g. "mid" for "mid-causal-fwd"."""
        return self.group.split("-")[0]

    @property
    def embed_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def flop_mode(self) -> str:
        """The attention work one timed call does: fwd, bwd or fwdbwd."""
        if self.level == "core":
            return self.mode
        return "fwd" if self.mode == "eval" else "fwdbwd"

    @property
    def needs_grad(self) -> bool:
        return self.flop_mode != "fwd"

    @property
    def key_value_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def flops(self) -> float:
        """FLOPs of one timed call (the standard count; see flops.py). Feature cases count the
        work their qkv side does (the band of a window, the real tokens of a packed batch)."""
        if self.feature:
            from .feature_workloads import feature_flops

            return feature_flops(self)
        total = attention_flops(
            self.batch, self.heads, self.q_len, self.kv_len, self.head_dim, self.causal, self.flop_mode
        )
        if self.level == "module":
            total += projection_flops(self.batch * self.q_len, self.embed_dim, self.flop_mode)
        return total

    @property
    def shape(self) -> str:
        if self.level == "module":
            return f"N{self.batch} L{self.q_len} E{self.embed_dim} H{self.heads}"
        heads = f"H{self.heads}" + (f"/{self.kv_heads}" if self.kv_heads and self.kv_heads != self.heads else "")
        extra = {"window": f" W{self.window}", "varlen": " packed"}.get(self.feature, "")
        return f"B{self.batch} {heads} L{self.q_len} S{self.kv_len} D{self.head_dim}{extra}"

    def valid_kv_lens(self) -> list[int]:
        """Keys each batch element may attend to under key padding (all of them otherwise).

        The first element sees every key, later ones progressively fewer (down to half):
        the ragged batch a padded cross-attention sees.
        """
        if not self.key_padding:
            return [self.kv_len] * self.batch
        return [max(1, self.kv_len - (b * self.kv_len) // (2 * self.batch)) for b in range(self.batch)]

    def tiny(self) -> "Case":
        """The same code path at a negligible size: warms up one-time library state
        (thread pools, kernel caches) before a memory baseline is taken."""
        if self.level == "module":
            return replace(self, name=self.name + "-tiny", batch=1, q_len=8, kv_len=8)
        if self.feature:  # the same head grouping and window, short sequences (packed: self-attention)
            q_len = min(self.q_len, 8)
            kv_len = q_len if self.feature == "varlen" else min(self.kv_len, 16)
            return replace(self, name=self.name + "-tiny", batch=min(self.batch, 2), q_len=q_len, kv_len=kv_len,
                           window=min(self.window, 4))
        return replace(self, name=self.name + "-tiny", batch=1, heads=1, q_len=min(self.q_len, 8), kv_len=min(self.kv_len, 8))

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict) -> "Case":
        data = dict(data)
        data["sides"] = tuple(data.get("sides", ()))  # JSON turns the tuple into a list
        return Case(**data)


def _core(group: str, b: int, h: int, l: int, s: int, d: int, modes, causal=False, key_padding=False,
          **extra) -> list[Case]:
    return [
        Case(f"{group}-{mode}", group, "core", mode, b, h, l, s, d, causal=causal, key_padding=key_padding, **extra)
        for mode in modes
    ]


def _module(n: int, l: int, e: int, h: int, modes=MODULE_MODES, group: str | None = None) -> list[Case]:
    group = group or f"module-L{l}"
    return [Case(f"{group}-{mode}", group, "module", mode, n, h, l, l, e // h) for mode in modes]


def cpu_grid(quick: bool = False) -> list[Case]:
    """The CPU grid of docs/benchmarks.md (float32 by default)."""
    both = ("fwd", "fwdbwd")
    if quick:
        return [
            *_core("small", 4, 8, 128, 128, 64, both),
            *_core("mid-causal", 2, 8, 512, 512, 64, both, causal=True),
            *_core("long", 1, 8, 1024, 1024, 64, ("fwd",)),
            *_core("cross-pad", 2, 8, 256, 1024, 64, ("fwd",), key_padding=True),
            *_core("decode", 4, 8, 1, 2048, 64, ("fwd",)),
            *_module(2, 512, 512, 8),
        ]
    cases = [*_core("small", 4, 8, 128, 128, 64, both)]
    for group, b, h, l in (("mid", 2, 8, 512), ("long", 1, 8, 1024), ("longer", 1, 4, 2048)):
        cases += _core(group, b, h, l, l, 64, both)
        cases += _core(f"{group}-causal", b, h, l, l, 64, both, causal=True)
    cases += _core("wide", 2, 4, 512, 512, 128, both)
    cases += _core("cross-pad", 2, 8, 256, 1024, 64, both, key_padding=True)
    cases += _core("decode", 4, 8, 1, 2048, 64, ("fwd",))
    for l in (512, 1024, 2048):
        cases += _module(2, l, 512, 8)
    return cases


GPU_TOKENS = 16 * 1024
GPU_HIDDEN = 2048


def cuda_grid(quick: bool = False) -> list[Case]:
    """The GPU grid (FlashAttention convention): B*L = 16k tokens, H*D = 2048, bfloat16 by default."""
    head_dims = (128,) if quick else (64, 128)
    seq_lens = (1024, 4096, 16384) if quick else (512, 1024, 2048, 4096, 8192, 16384)
    modes = ("fwd", "fwdbwd") if quick else CORE_MODES
    cases: list[Case] = []
    for d in head_dims:
        for l in seq_lens:
            for causal in (False, True):
                group = f"d{d}-L{l}" + ("-causal" if causal else "")
                cases += _core(group, GPU_TOKENS // l, GPU_HIDDEN // d, l, l, d, modes, causal=causal)
    for l in (1024, 4096) if quick else (512, 2048, 8192):
        cases += _module(GPU_TOKENS // l, l, 1024, 16)
    return cases


# The group `--cases targets` selects: exactly the CPU performance targets of issue 4 (targets.py
# holds the required ratios). Not part of the default run. Cases that the CPU grid already has
# are the same Case (same name, same definition), so their numbers are comparable across runs.
TARGETS_GROUP = "targets"


def targets_grid() -> list[Case]:
    """The cases issue 4's CPU targets are measured on (float32 by default)."""
    sdpa_only = ("qkv", "sdpa")  # the targets compare with SDPA's default backend only
    both = ("fwd", "fwdbwd")
    return [
        # 1, 2: core forward (and forward+backward, causal and not) at 2048 tokens, D 64 and 128.
        *_core("long2k", 1, 8, 2048, 2048, 64, both, sides=sdpa_only),
        *_core("long2k-causal", 1, 8, 2048, 2048, 64, ("fwdbwd",), causal=True, sides=sdpa_only),
        *_core("long2k-d128", 1, 8, 2048, 2048, 128, ("fwd",), sides=sdpa_only),
        *_core("mid", 2, 8, 512, 512, 64, ("fwd",)),
        # 5: decode and small (the grid's own cases).
        *_core("decode", 4, 8, 1, 2048, 64, ("fwd",)),
        *_core("small", 4, 8, 128, 128, 64, both),
        # 3: MHA training step, need_weights False and True (the grid's own module cases).
        *_module(2, 1024, 512, 8, ("train", "train-weights")),
        *_module(2, 2048, 512, 8, ("train", "train-weights")),
        # 4: peak memory of a training step against L.
        *(c for l in (1024, 2048, 4096) for c in _module(2, l, 256, 4, ("train",), group=f"module-E256-L{l}")),
        # 6: thread scaling, 1 thread against 2, interleaved.
        *_core("threads-long2k", 1, 8, 2048, 2048, 64, both, sides=sdpa_only, scaling_threads=2),
    ]


# The group `--cases features` selects: issue 17's targets (feature_targets.py holds the required
# ratios): sliding window vs full causal, GQA 8:1 vs SDPA enable_gqa and vs MHA with the key heads,
# a packed batch vs its padded call, KV-cache decoding vs SDPA. Not part of the default run.
FEATURES_GROUP = "features"


def features_grid() -> list[Case]:
    """The cases issue 17's CPU targets are measured on (float32 by default)."""
    both = ("fwd", "fwdbwd")
    return [
        # Sliding window of 256 keys over 8192 tokens, causal, against full causal attention.
        *_core("swa8k", 1, 8, 8192, 8192, 64, both, causal=True, feature="window", window=256,
               sides=("qkv", "qkv_full")),
        # GQA 8:1, causal: against SDPA with enable_gqa=True, and against MHA with the 4 key heads.
        *_core("gqa8to1", 1, 32, 2048, 2048, 64, both, causal=True, feature="gqa", kv_heads=4,
               sides=("qkv", "sdpa_gqa", "qkv_mha_kv")),
        # 8 sequences of at most 2048 tokens, half of the padded batch's tokens padding.
        *_core("varlen-halfpad", 8, 8, 2048, 2048, 64, both, causal=True, feature="varlen",
               sides=("qkv", "qkv_padded", "sdpa_padded")),
        # Decoding one token against 4096 cached keys, Llama-like heads.
        *_core("kvcache-decode", 8, 32, 1, 4096, 128, ("fwd",), causal=True, feature="kvcache", kv_heads=8,
               sides=("qkv", "sdpa_gqa")),
    ]


def extra_cases(device: str, quick: bool = False) -> list[Case]:
    """Cases outside the default grid that ``--cases`` can still name (the targets and features
    groups, on CPU)."""
    if device != "cpu":
        return []
    grid = {c.name: c for c in default_grid(device, quick)}
    return [c for c in (*targets_grid(), *features_grid()) if c.name not in grid]


def group_aliases(device: str) -> dict[str, list[str]]:
    """Named sets of cases for ``--cases``: "targets" and "features" on CPU."""
    if device != "cpu":
        return {}
    return {TARGETS_GROUP: [c.name for c in targets_grid()], FEATURES_GROUP: [c.name for c in features_grid()]}


def default_grid(device: str, quick: bool = False) -> list[Case]:
    if device == "cpu":
        return cpu_grid(quick)
    if device == "cuda":
        return cuda_grid(quick)
    raise ValueError(f"device must be 'cpu' or 'cuda'; got {device!r}")


def select_cases(cases: list[Case], selection: str | None, extra: list[Case] | None = None,
                 aliases: dict[str, list[str]] | None = None) -> list[Case]:
    """Keep the cases a comma list names, in grid order (then ``extra``'s order).

    A token matches a grid case by its full name ("mid-causal-fwd"), a glob ("*-fwdbwd"), its
    group ("mid-causal"), its grid row ("mid": causal and not), or its level ("core", "module").
    ``extra`` cases (outside the default run) match only by full name or group, or through an
    alias ("targets"), so ``--cases module`` still means the grid's module cases.
    A token that matches nothing is an error, so a typo never silently benchmarks nothing.
    """
    extra = [c for c in extra or [] if c.name not in {g.name for g in cases}]
    aliases = aliases or {}
    if not selection:
        return list(cases)
    tokens = [t.strip() for t in selection.split(",") if t.strip()]
    if not tokens:
        raise ValueError("--cases: expected a comma-separated list of case names; got an empty list")
    chosen: set[str] = set()
    for token in tokens:
        hits = [
            c.name
            for c in cases
            if fnmatch.fnmatchcase(c.name, token) or token in (c.group, c.family, c.level)
        ]
        hits += [c.name for c in extra if token in (c.name, c.group)]
        hits += aliases.get(token, [])
        if not hits:
            names = ", ".join([*(c.name for c in cases), *(c.name for c in extra), *aliases])
            raise ValueError(f"--cases: {token!r} matches no case; available: {names}")
        chosen.update(hits)
    return [c for c in [*cases, *extra] if c.name in chosen]
