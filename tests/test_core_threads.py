"""The CPU kernels give bit-for-bit the same results whatever the thread count.

Every reduction order (the dQ partials of key chunks, the bias gradient of broadcast shapes,
the row sums) must be a function of the problem alone, never of how many workers split it.
The shapes below have few (batch, head) pairs and several key blocks, so that the kernels
split keys as well as (batch, head) pairs; the issue 17 cases have more than 1024 keys, so that
the backward splits them into chunks (backward_tasks.h: chunks of at least 512 keys).
"""
import itertools

import pytest
import torch

from reference import alibi_slopes, feature_reference, varlen_reference

attention = torch.ops.qkv.attention
attention_weights = torch.ops.qkv.attention_weights
attention_with_weights = torch.ops.qkv.attention_with_weights

pytestmark = pytest.mark.usefixtures("cpu_capability")

THREADS = (1, 2, 3, 5)

# B, H, L, S: B * H of 1 and 2 (every split of keys), 6 (more pairs than 5 threads, but few).
SHAPES = [(1, 1, 150, 700), (1, 2, 300, 520), (2, 3, 130, 390)]

BIAS_SHAPES = {  # every broadcast pattern, by name, for B, H, L, S
    "full": lambda B, H, L, S: (B, H, L, S),
    "over-batch": lambda B, H, L, S: (H, L, S),
    "over-heads": lambda B, H, L, S: (B, 1, L, S),
    "over-batch-and-heads": lambda B, H, L, S: (L, S),
    "over-keys": lambda B, H, L, S: (B, H, L, 1),
    "over-queries": lambda B, H, L, S: (B, H, 1, S),
    "key-padding": lambda B, H, L, S: (B, 1, 1, S),
}


def for_each_thread_count(fn):
    """fn() under every thread count in THREADS, the previous count restored afterwards."""
    before = torch.get_num_threads()
    try:
        results = []
        for n in THREADS:
            torch.set_num_threads(n)
            results.append(fn())
        return results
    finally:
        torch.set_num_threads(before)


def assert_all_bitwise_equal(results, names):
    first = results[0]
    for n, result in zip(THREADS[1:], results[1:]):
        for name, a, b in zip(names, first, result):
            assert torch.equal(a, b), f"{name} differs between 1 and {n} threads (max diff {(a - b).abs().max()})"


def inputs(B, H, L, S, D=24, dtype=torch.float32):
    return tuple(torch.randn(B, H, n, D, dtype=dtype) for n in (L, S, S))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("is_causal", [False, True])
def test_forward(shape, is_causal):
    q, k, v = inputs(*shape)
    results = for_each_thread_count(lambda: attention(q, k, v, None, 0.0, is_causal))
    assert_all_bitwise_equal(results, ("out", "logsumexp"))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward(shape, is_causal, dtype):
    q, k, v = inputs(*shape, dtype=dtype)
    out, lse = attention(q, k, v, None, 0.0, is_causal)
    grad = torch.randn_like(out)
    results = for_each_thread_count(
        lambda: torch.ops.qkv.attention_backward(grad, q, k, v, None, out, lse, 0.0, is_causal, False, None, None,
                                                 False)[:3])
    assert_all_bitwise_equal(results, ("dq", "dk", "dv"))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias_shape", BIAS_SHAPES, ids=str)
def test_backward_with_bias_gradient(shape, bias_shape):
    B, H, L, S = shape
    q, k, v = inputs(*shape)
    bias = torch.randn(BIAS_SHAPES[bias_shape](B, H, L, S))
    out, lse = attention(q, k, v, bias)
    grad = torch.randn_like(out)
    results = for_each_thread_count(
        lambda: torch.ops.qkv.attention_backward(grad, q, k, v, bias, out, lse, 0.0, False, False, None, None, True))
    assert_all_bitwise_equal(results, ("dq", "dk", "dv", "dbias"))


def test_backward_with_dropout():
    q, k, v = inputs(1, 2, 200, 600)
    seed = torch.tensor(1234, dtype=torch.int64)
    out, lse = attention(q, k, v, None, 0.3, False, False, None, seed)
    grad = torch.randn_like(out)
    results = for_each_thread_count(
        lambda: torch.ops.qkv.attention_backward(grad, q, k, v, None, out, lse, 0.3, False, False, None, seed,
                                                 False)[:3])
    assert_all_bitwise_equal(results, ("dq", "dk", "dv"))


@pytest.mark.parametrize("average_heads", [False, True])
def test_weights_ops(average_heads):
    q, k, v = inputs(1, 3, 200, 300)
    bias = torch.randn(200, 300)
    _, lse = attention(q, k, v, bias)
    results = for_each_thread_count(lambda: (
        attention_weights(q, k, bias, lse, 0.0, False, False, None, None, average_heads),
        *attention_with_weights(q, k, v, bias, 0.0, True, False, None, None, average_heads)))
    assert_all_bitwise_equal(results, ("weights", "fused out", "fused logsumexp", "fused weights"))


def test_weights_backward():
    q = torch.randn(1, 2, 150, 24, requires_grad=True)
    k = torch.randn(1, 2, 400, 24, requires_grad=True)
    v = torch.randn(1, 2, 400, 24, requires_grad=True)
    bias = torch.randn(2, 150, 400, requires_grad=True)
    grad_out, grad_weights = torch.randn(1, 2, 150, 24), torch.randn(1, 2, 150, 400)

    def grads():
        out, _, weights = attention_with_weights(q, k, v, bias)
        return torch.autograd.grad((out, weights), (q, k, v, bias), (grad_out, grad_weights))

    assert_all_bitwise_equal(for_each_thread_count(grads), ("dq", "dk", "dv", "dbias"))


# ---- issue 17's options: grouped key/value heads (a backward task per key head), a sliding
# window (chunks whose first key block no query, or only some queries, see), ALiBi, softcap.

# A 200-key window: some chunks' first key block is seen by no query, or by part of them. A
# 700-key window: a row sees 3 or more key blocks, so its dQ sums differently when the chunk
# count changes (with 2 blocks, x + y is the same either way).
WINDOWS = [(200, -1), (700, -1)]
SOFTCAP = 3.0


def assert_close_to_reference(got, want, names):
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g.double(), w, atol=2e-4, rtol=2e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("bottom_right", [False, True])
def test_backward_with_groups_window_alibi_softcap(bottom_right, window):
    B, H, Hk, L, S, D = 1, 4, 2, 600, 1100, 16
    q, k, v = torch.randn(B, H, L, D), torch.randn(B, Hk, S, D), torch.randn(B, Hk, S, D)
    slopes = alibi_slopes(H)
    softcap = SOFTCAP
    out, lse = attention(q, k, v, None, 0.0, True, bottom_right, None, None, *window, softcap, slopes)
    grad = torch.randn_like(out)
    results = for_each_thread_count(
        lambda: torch.ops.qkv.attention_backward(grad, q, k, v, None, out, lse, 0.0, True, bottom_right, None, None,
                                                 False, *window, softcap, slopes)[:3])
    assert_all_bitwise_equal(results, ("dq", "dk", "dv"))
    inputs = [t.double().requires_grad_() for t in (q, k, v)]
    want_out, _ = feature_reference(*inputs, is_causal=True, bottom_right=bottom_right, window=window, softcap=softcap,
                                    alibi_slopes=slopes)
    assert_close_to_reference(results[0], torch.autograd.grad(want_out, inputs, grad.double()), ("dq", "dk", "dv"))


# A band bounded on both sides (not causal): the chunks take contiguous key blocks, and each packs
# and sums only the queries that see them (attention_cpu.cpp, contiguous_chunks); 2100 keys give 4
# chunks of a key head, so inner chunks' query ranges start and end inside the sequence.
@pytest.mark.parametrize("window", [(300, 150), (40, 500)], ids=str)
def test_backward_with_a_two_sided_window(window):
    B, H, Hk, L, S, D = 1, 2, 2, 1900, 2100, 16
    q, k, v = torch.randn(B, H, L, D), torch.randn(B, Hk, S, D), torch.randn(B, Hk, S, D)
    out, lse = attention(q, k, v, None, 0.0, False, False, None, None, *window)
    grad = torch.randn_like(out)
    results = for_each_thread_count(
        lambda: torch.ops.qkv.attention_backward(grad, q, k, v, None, out, lse, 0.0, False, False, None, None,
                                                 False, *window)[:3])
    assert_all_bitwise_equal(results, ("dq", "dk", "dv"))
    inputs = [t.double().requires_grad_() for t in (q, k, v)]
    want_out, _ = feature_reference(*inputs, is_causal=False, bottom_right=False, window=window)
    assert_close_to_reference(results[0], torch.autograd.grad(want_out, inputs, grad.double()), ("dq", "dk", "dv"))


@pytest.mark.parametrize("bias_shape", ["over-heads", "over-batch-and-heads", "key-padding"], ids=str)
def test_backward_with_groups_and_bias_gradient(bias_shape):
    B, H, Hk, L, S, D = 2, 4, 2, 130, 1100, 16
    q, k, v = torch.randn(B, H, L, D), torch.randn(B, Hk, S, D), torch.randn(B, Hk, S, D)
    bias = torch.randn(BIAS_SHAPES[bias_shape](B, H, L, S))
    out, lse = attention(q, k, v, bias)
    grad = torch.randn_like(out)
    results = for_each_thread_count(
        lambda: torch.ops.qkv.attention_backward(grad, q, k, v, bias, out, lse, 0.0, False, False, None, None, True))
    assert_all_bitwise_equal(results, ("dq", "dk", "dv", "dbias"))


# (4, 2, 16): the key-chunk split; (8, 1, 32): one task per query head (backward_tasks.h:
# BackwardTasks::subsets), dK and dV summed in head order.
@pytest.mark.parametrize("H, Hk, D", [(4, 2, 16), (8, 1, 32)], ids=["key-chunks", "query-heads"])
@pytest.mark.parametrize("window", WINDOWS, ids=str)
def test_varlen_backward(window, H, Hk, D):
    lengths_q, lengths_k = [300, 40, 600], [1100, 30, 700]  # the 30-key sequence has fewer key blocks than chunks
    cu_q = torch.tensor([0, *itertools.accumulate(lengths_q)], dtype=torch.int32)
    cu_k = torch.tensor([0, *itertools.accumulate(lengths_k)], dtype=torch.int32)
    q = torch.randn(sum(lengths_q), H, D)
    k, v = torch.randn(sum(lengths_k), Hk, D), torch.randn(sum(lengths_k), Hk, D)
    slopes = alibi_slopes(H)
    softcap = SOFTCAP
    args = (cu_q, cu_k, max(lengths_q), max(lengths_k), 0.0, True, True, None, None, *window, softcap, slopes)
    out, lse = torch.ops.qkv.attention_varlen(q, k, v, *args)
    grad = torch.randn_like(out)
    results = for_each_thread_count(
        lambda: torch.ops.qkv.attention_varlen_backward(grad, q, k, v, out, lse, *args))
    assert_all_bitwise_equal(results, ("dq", "dk", "dv"))
    inputs = [t.double().requires_grad_() for t in (q, k, v)]
    want_out, _ = varlen_reference(*inputs, cu_q, cu_k, is_causal=True, bottom_right=True, window=window,
                                   softcap=softcap, alibi_slopes=slopes)
    assert_close_to_reference(results[0], torch.autograd.grad(want_out, inputs, grad.double()), ("dq", "dk", "dv"))


# ---- grouped-query attention split by query heads (backward_tasks.h: BackwardTasks::subsets).
# With several query heads per key head and few pairs, a task runs one query head, and dK, dV
# are summed over the heads key block by key block in head order (KvBlockSums) however the tasks
# end. "8-per-key-head" and "4-per-key-head" split by heads; "many-pairs" has enough (sequence,
# key head) pairs to run each whole in one task. D = 32 float32 writes dQ, dK and dV straight
# into the gradients, D = 24 and bfloat16 through buffers.
GQA_SPLITS = {  # name: B, H, Hk, L, S
    "8-per-key-head": (1, 16, 2, 300, 1100),
    "4-per-key-head": (2, 8, 2, 150, 700),
    "many-pairs": (4, 16, 8, 100, 300),
}


def gqa_inputs(B, H, Hk, L, S, D, dtype=torch.float32):
    return torch.randn(B, H, L, D, dtype=dtype), torch.randn(B, Hk, S, D, dtype=dtype), torch.randn(B, Hk, S, D,
                                                                                                     dtype=dtype)


@pytest.mark.parametrize("split", GQA_SPLITS, ids=str)
@pytest.mark.parametrize("D,dtype", [(32, torch.float32), (24, torch.float32), (32, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("options", ["causal", "window-alibi-softcap"], ids=str)
def test_backward_split_by_query_heads(split, D, dtype, options):
    B, H, Hk, L, S = GQA_SPLITS[split]
    q, k, v = gqa_inputs(B, H, Hk, L, S, D, dtype)
    window, softcap, slopes = ((-1, -1), 0.0, None) if options == "causal" else ((700, -1), SOFTCAP, alibi_slopes(H))
    out, lse = attention(q, k, v, None, 0.0, True, True, None, None, *window, softcap, slopes)
    grad = torch.randn_like(out)
    results = for_each_thread_count(
        lambda: torch.ops.qkv.attention_backward(grad, q, k, v, None, out, lse, 0.0, True, True, None, None, False,
                                                 *window, softcap, slopes)[:3])
    assert_all_bitwise_equal(results, ("dq", "dk", "dv"))
    inputs = [t.double().requires_grad_() for t in (q, k, v)]
    want_out, _ = feature_reference(*inputs, is_causal=True, bottom_right=True, window=window, softcap=softcap,
                                    alibi_slopes=slopes)
    want = torch.autograd.grad(want_out, inputs, grad.double())
    if dtype == torch.float32:
        assert_close_to_reference(results[0], want, ("dq", "dk", "dv"))
    else:  # bfloat16 inputs and outputs: the reference to bfloat16's precision
        for name, g, w in zip(("dq", "dk", "dv"), results[0], want):
            torch.testing.assert_close(g.double(), w, atol=5e-2, rtol=5e-2, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("bias_shape", BIAS_SHAPES, ids=str)
def test_backward_split_by_query_heads_and_bias_gradient(bias_shape):
    # A bias broadcast over heads keeps a pair's heads in one task (key chunks instead); the others
    # split by heads, each task writing its own head's elements.
    B, H, Hk, L, S, D = 2, 8, 1, 130, 1100, 16
    q, k, v = gqa_inputs(B, H, Hk, L, S, D)
    bias = torch.randn(BIAS_SHAPES[bias_shape](B, H, L, S))
    out, lse = attention(q, k, v, bias)
    grad = torch.randn_like(out)
    results = for_each_thread_count(
        lambda: torch.ops.qkv.attention_backward(grad, q, k, v, bias, out, lse, 0.0, False, False, None, None, True))
    assert_all_bitwise_equal(results, ("dq", "dk", "dv", "dbias"))
    inputs = [t.double().requires_grad_() for t in (q, k, v, bias)]
    want_out, _ = feature_reference(*inputs)
    want = torch.autograd.grad(want_out, inputs, grad.double())
    assert_close_to_reference(results[0], want, ("dq", "dk", "dv", "dbias"))


def test_backward_split_by_query_heads_and_dropout():
    B, H, Hk, L, S, D = 1, 8, 1, 200, 600, 32
    q, k, v = gqa_inputs(B, H, Hk, L, S, D)
    seed = torch.tensor(1234, dtype=torch.int64)
    out, lse = attention(q, k, v, None, 0.3, True, False, None, seed)
    grad = torch.randn_like(out)
    results = for_each_thread_count(
        lambda: torch.ops.qkv.attention_backward(grad, q, k, v, None, out, lse, 0.3, True, False, None, seed,
                                                 False)[:3])
    assert_all_bitwise_equal(results, ("dq", "dk", "dv"))
