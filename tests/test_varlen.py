"""torch.ops.qkv.attention_varlen: packed variable-length batches (no padding) through the core
kernel, forward and backward, against each sequence's float64 reference (reference.py)."""
import itertools

import pytest
import torch

from reference import alibi_slopes, dropout_seed, tolerance, varlen_reference

pytestmark = pytest.mark.usefixtures("device")

varlen = torch.ops.qkv.attention_varlen


def offsets(lengths):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


def packed(lengths_q, lengths_k, H, Hk, D, Dv=None, dtype=torch.float32, requires_grad=False, extra_rows=0):
    Dv = D if Dv is None else Dv
    tq, tk = sum(lengths_q) + extra_rows, sum(lengths_k) + extra_rows
    q = torch.randn(tq, H, D, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(tk, Hk, D, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(tk, Hk, Dv, dtype=dtype, requires_grad=requires_grad)
    return q, k, v, offsets(lengths_q), offsets(lengths_k)




def call(q, k, v, cu_q, cu_k, max_q=None, max_k=None, dropout_p=0.0, is_causal=False, bottom_right=True,
         scale=None, seed=None, window=(-1, -1), softcap=0.0, alibi=None):
    max_q = int((cu_q[1:] - cu_q[:-1]).max()) if max_q is None else max_q
    max_k = int((cu_k[1:] - cu_k[:-1]).max()) if max_k is None else max_k
    return varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, bottom_right, scale, seed,
                  window[0], window[1], softcap, alibi)


LENGTHS = {
    "mixed": ([5, 130, 1, 257, 64], [7, 129, 1, 300, 64]),
    "empty_sequences": ([0, 40, 0, 3], [10, 0, 0, 50]),
    "length_one": ([1, 1, 1], [1, 300, 2]),
    "longer_queries": ([300, 20], [40, 20]),
    "single": ([200], [200]),
}


@pytest.mark.parametrize("name", sorted(LENGTHS))
@pytest.mark.parametrize("options", [
    dict(),
    dict(is_causal=True),
    dict(is_causal=True, bottom_right=False),
    dict(is_causal=True, window=(16, -1), softcap=3.0, alibi=True),
    dict(window=(40, 7), alibi="per_batch"),
], ids=lambda o: "-".join(f"{k}" for k in sorted(o)) or "plain")
@pytest.mark.parametrize("H,Hk", [(4, 4), (4, 1)])
def test_forward_matches_each_sequence(name, options, H, Hk):
    lengths_q, lengths_k = LENGTHS[name]
    q, k, v, cu_q, cu_k = packed(lengths_q, lengths_k, H, Hk, 24, 17)
    options = dict(options)
    alibi = options.pop("alibi", None)
    if alibi:
        options["alibi"] = alibi_slopes(H, len(lengths_q) if alibi == "per_batch" else None)
    out, lse = call(q, k, v, cu_q, cu_k, **options)
    ref_options = {"is_causal": options.get("is_causal", False), "bottom_right": options.get("bottom_right", True),
                   "window": options.get("window", (-1, -1)), "softcap": options.get("softcap", 0.0),
                   "alibi_slopes": options.get("alibi")}
    want, want_lse = varlen_reference(q, k, v, cu_q, cu_k, **ref_options)
    assert out.shape == want.shape and lse.shape == want_lse.shape == (H, q.shape[0])
    torch.testing.assert_close(out.double(), want, **tolerance(torch.float32))
    finite = torch.isfinite(want_lse)
    assert torch.isneginf(lse[~finite]).all()
    torch.testing.assert_close(lse.double()[finite], want_lse[finite], **tolerance(torch.float32))


def test_gradcheck():
    q, k, v, cu_q, cu_k = packed([3, 0, 5, 1], [4, 2, 6, 1], 4, 2, 3, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v: call(q, k, v, cu_q, cu_k, is_causal=True, window=(2, -1), softcap=1.5, alibi=alibi_slopes(4))[0]
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_gradcheck_with_dropout():
    q, k, v, cu_q, cu_k = packed([4, 6], [5, 3], 2, 1, 3, dtype=torch.float64, requires_grad=True)
    seed = dropout_seed(9)
    fn = lambda q, k, v: call(q, k, v, cu_q, cu_k, dropout_p=0.3, seed=seed)[0]
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("H,Hk", [(4, 2), (2, 2)])
def test_gradients_match_each_sequence(H, Hk):
    q, k, v, cu_q, cu_k = packed([65, 0, 130, 1], [129, 3, 257, 40], H, Hk, 16, 8, requires_grad=True)
    out, _ = call(q, k, v, cu_q, cu_k, is_causal=True, window=(70, -1), softcap=4.0, alibi=alibi_slopes(H))
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want_out, _ = varlen_reference(*inputs, cu_q, cu_k, is_causal=True, bottom_right=True, window=(70, -1),
                                   softcap=4.0, alibi_slopes=alibi_slopes(H))
    want = torch.autograd.grad(want_out, inputs, grad_out.double())
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g.double(), w, atol=2e-4, rtol=2e-4, msg=f"grad {name}")


def test_equal_lengths_equal_the_dense_call_dropout_included():
    # The dropout counter uses max_seqlen strides: a packed batch of equal lengths drops exactly
    # what the dense call with the same seed drops.
    B, L, S, H, Hk, D = 3, 20, 30, 4, 2, 8
    q = torch.randn(B, L, H, D, dtype=torch.float64)
    k = torch.randn(B, S, Hk, D, dtype=torch.float64)
    v = torch.randn(B, S, Hk, D, dtype=torch.float64)
    seed = dropout_seed(5)
    dense, dense_lse = torch.ops.qkv.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, 0.4,
                                               True, True, None, seed, 6, -1, 2.0, alibi_slopes(H))
    out, lse = call(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), offsets([L] * B), offsets([S] * B),
                    dropout_p=0.4, is_causal=True, seed=seed, window=(6, -1), softcap=2.0, alibi=alibi_slopes(H))
    torch.testing.assert_close(out, dense.transpose(1, 2).flatten(0, 1))
    torch.testing.assert_close(lse, dense_lse.permute(1, 0, 2).flatten(1))


def test_rows_past_the_last_offset_are_zero():
    q, k, v, cu_q, cu_k = packed([5, 7], [6, 8], 2, 2, 8, extra_rows=3)
    out, lse = call(q, k, v, cu_q, cu_k)
    assert (out[12:] == 0).all() and torch.isneginf(lse[:, 12:]).all()


def test_strided_packed_inputs():
    # q, k, v as views of one packed projection (total, 3, H, D), as after a fused qkv GEMM.
    lengths = [17, 1, 90]
    qkv_rows = torch.randn(sum(lengths), 3, 4, 16)
    q, k, v = qkv_rows.unbind(1)
    cu = offsets(lengths)
    out, _ = call(q, k, v, cu, cu, is_causal=True)
    want, _ = varlen_reference(q, k, v, cu, cu, is_causal=True, bottom_right=True)
    torch.testing.assert_close(out.double(), want, **tolerance(torch.float32))


@pytest.mark.parametrize("make,message", [
    (lambda q, k, v, cq, ck: (q, k, v, cq.float(), ck), r"cu_seqlens_q must be an int32 or int64 tensor"),
    (lambda q, k, v, cq, ck: (q, k, v, cq[None], ck), r"cu_seqlens_q must be a 1-D"),
    (lambda q, k, v, cq, ck: (q, k, v, cq, ck[:-1]), r"cu_seqlens_k must have batch \+ 1 = 3 entries"),
    (lambda q, k, v, cq, ck: (q, k, v, cq + 1, ck), r"cu_seqlens_q must start at 0"),
    (lambda q, k, v, cq, ck: (q, k, v, torch.tensor([0, 8, 6], dtype=torch.int32), ck),
     r"cu_seqlens_q must be non-decreasing"),
    (lambda q, k, v, cq, ck: (q, k, v, torch.tensor([0, 5, 13], dtype=torch.int32), ck),
     r"cu_seqlens_q's last offset 13 is past query's 12 rows"),
    (lambda q, k, v, cq, ck: (q, k[:10], v[:10], cq, ck), r"cu_seqlens_k's last offset 14 is past key's 10 rows"),
    (lambda q, k, v, cq, ck: (q, k[:, :1], v, cq, ck), r"value must have shape \(14, 1, value_head_dim\)"),
    (lambda q, k, v, cq, ck: (q[:, :3], k[:, :2], v[:, :2], cq, ck), r"heads \(3\) must be divisible by .* \(2\)"),
    (lambda q, k, v, cq, ck: (q[None], k, v, cq, ck), r"query must be a 3-D tensor \(total_q, heads, head_dim\)"),
])
def test_errors_name_the_argument(make, message):
    q, k, v, cu_q, cu_k = packed([5, 7], [6, 8], 4, 2, 8)
    with pytest.raises(RuntimeError, match=message):
        call(*make(q, k, v, cu_q, cu_k), max_q=7, max_k=8)


def test_max_seqlen_must_cover_the_longest_sequence():
    q, k, v, cu_q, cu_k = packed([5, 7], [6, 8], 2, 2, 8)
    with pytest.raises(RuntimeError, match=r"max_seqlen_q \(6\) must be at least the longest query sequence \(7\)"):
        call(q, k, v, cu_q, cu_k, max_q=6, max_k=8)
    with pytest.raises(RuntimeError, match=r"max_seqlen_k \(2\) must be at least the longest key sequence \(8\)"):
        call(q, k, v, cu_q, cu_k, max_q=7, max_k=2)


def test_int64_offsets_are_accepted():
    q, k, v, cu_q, cu_k = packed([5, 7], [6, 8], 2, 2, 8)
    a, _ = call(q, k, v, cu_q, cu_k)
    b, _ = call(q, k, v, cu_q.long(), cu_k.long())
    assert torch.equal(a, b)
