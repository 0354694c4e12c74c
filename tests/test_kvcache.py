"""torch.ops.qkv.attention_kvcache: new keys written into the caches in place, then attention over
the first cache_seqlens[b] + seqlen_new keys (bottom-right aligned), against kvcache_reference."""
import pytest
import torch

from reference import alibi_slopes, kvcache_reference, tolerance

pytestmark = pytest.mark.usefixtures("device")

kvcache = torch.ops.qkv.attention_kvcache




def make(B, H, Hk, Sq, Sc, Snew, D, Dv=None, dtype=torch.float32):
    Dv = D if Dv is None else Dv
    q = torch.randn(B, H, Sq, D, dtype=dtype)
    k_cache, v_cache = torch.randn(B, Hk, Sc, D, dtype=dtype), torch.randn(B, Hk, Sc, Dv, dtype=dtype)
    k_new = torch.randn(B, Hk, Snew, D, dtype=dtype) if Snew else None
    v_new = torch.randn(B, Hk, Snew, Dv, dtype=dtype) if Snew else None
    return q, k_cache, v_cache, k_new, v_new


def check(q, k_cache, v_cache, k_new, v_new, cache_seqlens, is_causal=False, window=(-1, -1), softcap=0.0,
          alibi=None, scale=None, dtype=torch.float32):
    k_before, v_before = k_cache.clone(), v_cache.clone()
    want, want_lse, k_after, v_after = kvcache_reference(
        q, k_before, v_before, k_new, v_new, cache_seqlens, is_causal=is_causal, window=window, softcap=softcap,
        alibi_slopes=alibi, scale=scale)
    out, lse = kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens, is_causal, scale, window[0], window[1],
                       softcap, alibi)
    torch.testing.assert_close(k_cache.double(), k_after, rtol=0, atol=0)  # written in place, exactly
    torch.testing.assert_close(v_cache.double(), v_after, rtol=0, atol=0)
    torch.testing.assert_close(out.double(), want, **tolerance(dtype))
    finite = torch.isfinite(want_lse)
    assert torch.isneginf(lse[~finite]).all()
    torch.testing.assert_close(lse.double()[finite], want_lse[finite], **tolerance(dtype))
    return out


@pytest.mark.parametrize("B,H,Hk,Sq,Sc,Snew", [
    (3, 8, 2, 1, 300, 1),     # decoding one token
    (2, 4, 4, 1, 4097, 1),    # long cache, few (batch, head) pairs: keys split across threads
    (1, 32, 8, 1, 1000, 1),
    (2, 4, 1, 5, 300, 5),     # a few new tokens at once (speculative decoding)
    (2, 4, 2, 130, 400, 130),  # a prefill chunk
    (2, 4, 2, 1, 64, 0),      # no new keys: attend to the cache as it is
])
@pytest.mark.parametrize("per_batch", [False, True])
@pytest.mark.parametrize("is_causal", [False, True])
def test_matches_reference(B, H, Hk, Sq, Sc, Snew, per_batch, is_causal):
    q, k_cache, v_cache, k_new, v_new = make(B, H, Hk, Sq, Sc, Snew, 16, 24)
    room = Sc - Snew
    if per_batch:
        cache_seqlens = torch.linspace(0, room, B).to(torch.int32)
    else:
        cache_seqlens = torch.full((B,), room // 2, dtype=torch.int32)
    check(q, k_cache, v_cache, k_new, v_new, cache_seqlens, is_causal=is_causal)


def test_windows_alibi_softcap():
    q, k_cache, v_cache, k_new, v_new = make(3, 8, 2, 2, 600, 2, 32)
    cache_seqlens = torch.tensor([598, 100, 3], dtype=torch.int32)
    check(q * 3, k_cache, v_cache, k_new, v_new, cache_seqlens, is_causal=True, window=(255, -1), softcap=4.0,
          alibi=alibi_slopes(8, 3), scale=0.2)
    check(q, k_cache, v_cache, k_new, v_new, cache_seqlens, window=(10, 1), alibi=alibi_slopes(8))


@pytest.mark.cpu_only("thread counts steer the CPU kernels' key split")
def test_split_keys_match_the_unsplit_result():
    # One query token against many keys with a single (batch, kv head): the keys are split across
    # threads and combined by logsumexp; with one thread there is no split.
    q, k_cache, v_cache, k_new, v_new = make(1, 4, 1, 1, 5000, 1, 64)
    cache_seqlens = torch.tensor([4321], dtype=torch.int32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, one_lse = kvcache(q, k_cache.clone(), v_cache.clone(), k_new, v_new, cache_seqlens, True)
        torch.set_num_threads(max(2, threads))
        out = check(q, k_cache, v_cache, k_new, v_new, cache_seqlens, is_causal=True)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(out, one, atol=1e-6, rtol=1e-5)


def test_without_cache_seqlens_the_whole_cache_is_used():
    q, k_cache, v_cache, _, _ = make(2, 4, 2, 3, 50, 0, 8)
    check(q, k_cache, v_cache, None, None, None, is_causal=True)


def test_float64_and_reduced_precision():
    for dtype in (torch.float64, torch.bfloat16):
        q, k_cache, v_cache, k_new, v_new = make(2, 4, 2, 1, 300, 1, 16, dtype=dtype)
        check(q, k_cache, v_cache, k_new, v_new, torch.tensor([5, 299], dtype=torch.int32), dtype=dtype)


def test_strided_cache_views():
    # flash-attn's (batch, seqlen, nheads, headdim) caches seen as (B, Hk, S, D) views: the
    # writes land in the caller's storage.
    k_store, v_store = torch.randn(2, 100, 2, 16), torch.randn(2, 100, 2, 16)
    q = torch.randn(2, 4, 1, 16)
    k_new, v_new = torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16)
    cache_seqlens = torch.tensor([10, 60], dtype=torch.int32)
    check(q, k_store.transpose(1, 2), v_store.transpose(1, 2), k_new, v_new, cache_seqlens, is_causal=True)
    assert torch.equal(k_store[1, 60], k_new[1, :, 0])


@pytest.mark.parametrize("make_args,message", [
    (lambda q, kc, vc, k, v, n: (q, kc, vc, k, v, n + 2), r"k_cache has room for 64 keys; cache_seqlens\[1\] \+ seqlen_new = 65"),
    (lambda q, kc, vc, k, v, n: (q, kc, vc, k, None, n), r"key and value must be given together"),
    (lambda q, kc, vc, k, v, n: (q, kc, vc, k, v, None), r"cache_seqlens is required when key and value are given"),
    (lambda q, kc, vc, k, v, n: (q, kc, vc, k, v, n.float()), r"cache_seqlens must be an int32 or int64 tensor"),
    (lambda q, kc, vc, k, v, n: (q, kc, vc, k, v, n[:1]), r"cache_seqlens must have shape \(2\)"),
    (lambda q, kc, vc, k, v, n: (q, kc, vc, k, v, n - 70), r"cache_seqlens must be >= 0; got -"),
    (lambda q, kc, vc, k, v, n: (q, kc, vc[:, :, :10], k, v, n), r"v_cache must have shape \(2, 2, 64, value_head_dim\)"),
    (lambda q, kc, vc, k, v, n: (q, kc, vc, k[..., :4], v, n), r"key must have shape \(2, 2, seqlen_new, 16\)"),
    (lambda q, kc, vc, k, v, n: (q[:, :3], kc, vc, k, v, n), r"heads \(3\) must be divisible by .* \(2\)"),
    (lambda q, kc, vc, k, v, n: (q, kc.double(), vc, k, v, n), r"k_cache must have the query's dtype"),
])
def test_errors_name_the_argument(make_args, message):
    q, k_cache, v_cache, k_new, v_new = make(2, 4, 2, 1, 64, 1, 16)
    cache_seqlens = torch.tensor([3, 62], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=message):
        kvcache(*make_args(q, k_cache, v_cache, k_new, v_new, cache_seqlens), False)


def test_inference_only():
    q, k_cache, v_cache, k_new, v_new = make(1, 2, 1, 1, 10, 1, 4)
    q.requires_grad_()
    out, _ = kvcache(q, k_cache, v_cache, k_new, v_new, torch.tensor([2], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="attention_kvcache"):
        out.sum().backward()
