"""The op contract for the tensors every op takes besides query/key/value: the dropout seed (a
0-dim int64 CPU tensor, settled once per call), and the device, dtype and shape of every
optional or auxiliary tensor (bias, logsumexp, out, gradients, projection weights). A tensor
that breaks it is a clear error naming the op and the argument, never a read of memory that
is not there (a meta tensor beside CPU inputs used to give uninitialised outputs)."""
import pytest
import torch

ops = torch.ops.qkv
SEED_ERROR = r"dropout_seed must be a 0-dim int64 tensor on the CPU"


def core_inputs():
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)
    out, lse = ops.attention(q, k, v)
    return q, k, v, out, lse


def packed_inputs():
    qkv = torch.randn(2, 5, 3, 3, 8)
    out, lse = ops.attention_qkvpacked(qkv)
    return qkv, out, lse


def projection_inputs():
    x, mem = torch.randn(2, 4, 8), torch.randn(2, 6, 5)
    return x, mem, (lambda *s: torch.randn(*s) * 0.3)


# Each entry calls one op with `seed` as its dropout seed (dropout_p > 0).
SEED_CALLS = {
    "attention": lambda seed: ops.attention(*core_inputs()[:3], None, 0.3, False, False, None, seed),
    "attention_backward": lambda seed: (lambda q, k, v, out, lse: ops.attention_backward(
        torch.randn_like(out), q, k, v, None, out, lse, 0.3, False, False, None, seed, False))(*core_inputs()),
    "attention_qkvpacked": lambda seed: ops.attention_qkvpacked(packed_inputs()[0], None, 0.3, False, None, seed),
    "attention_qkvpacked_backward": lambda seed: (lambda qkv, out, lse: ops.attention_qkvpacked_backward(
        torch.randn_like(out), qkv, None, out, lse, 0.3, False, None, seed, False))(*packed_inputs()),
    "attention_weights": lambda seed: (lambda q, k, v, out, lse: ops.attention_weights(
        q, k, None, lse, 0.3, False, False, None, seed))(*core_inputs()),
    "attention_with_weights": lambda seed: ops.attention_with_weights(*core_inputs()[:3], None, 0.3, False, False,
                                                                      None, seed),
    "attention_with_weights (two-op path)": lambda seed: (lambda q, k, v, out, lse: ops.attention_with_weights(
        q[:, :, :1], k, v, None, 0.3, False, False, None, seed))(*core_inputs()),
    "attention_weights_backward": lambda seed: (lambda q, k, v, out, lse: ops.attention_weights_backward(
        torch.randn(2, 3, 5, 7), q, k, None, lse, 0.3, False, False, None, seed, False))(*core_inputs()),
    "multi_head_attention": lambda seed: (lambda x, mem, w: ops.multi_head_attention(
        x, x, x, 2, w(24, 8), None, w(8, 8), None, None, False, 0.3, seed))(*projection_inputs()),
    "masked_self_attention": lambda seed: (lambda x, mem, w: ops.masked_self_attention(
        x, 2, w(24, 8), None, w(8, 8), None, None, 0.3, seed))(*projection_inputs()),
    "cross_attention": lambda seed: (lambda x, mem, w: ops.cross_attention(
        x, mem, 2, w(8, 8), w(8, 5), w(8, 5), None, w(8, 8), None, None, 0.3, seed))(*projection_inputs()),
}


@pytest.mark.parametrize("op", list(SEED_CALLS))
@pytest.mark.parametrize("seed,got", [
    (torch.tensor([5]), r"1-D Long tensor of shape \[1\]"),  # the old form: fake tensors reject it beside CUDA inputs
    (torch.tensor([5, 6]), "1-D Long"),
    (torch.tensor(5, dtype=torch.int32), "0-D Int"),
    (torch.tensor(5.0), "0-D Float"),
    (torch.tensor(5, device="meta"), "on meta"),  # used to read uninitialised memory
], ids=["1-D one element", "two elements", "int32", "float", "meta"])
def test_every_op_holds_the_seed_to_the_contract(op, seed, got):
    with pytest.raises(RuntimeError, match=rf"qkv.{op.split()[0]}: {SEED_ERROR}.*got .*{got}"):
        SEED_CALLS[op](seed)


@pytest.mark.parametrize("op", list(SEED_CALLS))
def test_every_op_takes_a_0_dim_cpu_seed_and_replays_it(op):
    def run(seed):
        torch.manual_seed(0)  # the same inputs
        outs = SEED_CALLS[op](torch.tensor(seed))
        return [t for t in (outs if isinstance(outs, tuple) else (outs,)) if t.numel()]

    first, again, other = run(123), run(123), run(124)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_meta_seed_is_accepted_with_meta_inputs():
    q, k, v = (t.to("meta") for t in core_inputs()[:3])
    out, lse = ops.attention(q, k, v, None, 0.3, False, False, None, torch.tensor(5, device="meta"))
    assert out.is_meta and out.shape == (2, 3, 5, 4)


@pytest.mark.parametrize("op", ["attention_backward", "attention_weights_backward", "attention_qkvpacked_backward"])
def test_backward_ops_with_dropout_need_the_forward_seed(op):
    # A fresh draw would give the gradient of another mask: silently wrong before.
    with pytest.raises(RuntimeError, match=rf"qkv.{op}: with dropout_p > 0 .*dropout_seed must be the seed of the "
                                           r"forward call .*got None"):
        SEED_CALLS[op](None)


def meta(t):
    return t.to("meta")


# (op, call with one argument made wrong, expected message)
def bad_argument_cases():
    q, k, v, out, lse = core_inputs()
    g = torch.randn(2, 3, 5, 7)
    x, mem, w = projection_inputs()
    fwd = lambda bias: ops.attention(q, k, v, bias)
    bwd = lambda go=torch.randn_like(out), o=out, l=lse, bias=None: ops.attention_backward(
        go, q, k, v, bias, o, l, 0.0, False, False, None, None, False)
    weights = lambda l=lse, bias=None: ops.attention_weights(q, k, bias, l)
    wbwd = lambda gw=g, l=lse: ops.attention_weights_backward(gw, q, k, None, l, 0.0, False, False, None, None, False)
    qkv, packed_out, packed_lse = packed_inputs()
    packed_bwd = lambda go=torch.randn_like(packed_out), o=packed_out, l=packed_lse, bias=None: (
        ops.attention_qkvpacked_backward(go, qkv, bias, o, l, 0.0, False, None, None, False))
    mha = lambda in_w=w(24, 8), in_b=None, out_w=w(8, 8), out_b=None, bias=None: ops.multi_head_attention(
        x, x, x, 2, in_w, in_b, out_w, out_b, bias)
    cross = lambda m=mem, wq=w(8, 8), bias=None: ops.cross_attention(x, m, 2, wq, w(8, 5), w(8, 5), None, w(8, 8),
                                                                     None, bias)
    return [
        ("attention bias on meta", lambda: fwd(meta(torch.zeros(5, 7))), r"qkv.attention: bias must be on the query's device cpu"),
        ("attention bias float64", lambda: fwd(torch.zeros(5, 7, dtype=torch.float64)), r"qkv.attention: bias must be a floating tensor of the query's dtype"),
        ("backward grad_out on meta", lambda: bwd(go=meta(out)), r"qkv.attention_backward: grad_out must be a Float tensor of shape \[2, 3, 5, 4\] on cpu; got .* on meta"),
        ("backward grad_out float64", lambda: bwd(go=out.double()), r"grad_out must be a Float tensor .*Double"),
        ("backward out on meta", lambda: bwd(o=meta(out)), r"qkv.attention_backward: out must be a Float tensor .* on meta"),
        ("backward logsumexp on meta", lambda: bwd(l=meta(lse)), r"qkv.attention_backward: logsumexp must be a Float tensor of shape \[2, 3, 5\] on cpu"),
        ("backward bias on meta", lambda: bwd(bias=meta(torch.zeros(5, 7))), r"qkv.attention_backward: bias must be on the query's device"),
        ("packed bias on meta", lambda: ops.attention_qkvpacked(qkv, meta(torch.zeros(5, 5))), r"qkv.attention_qkvpacked: bias must be on the query's device cpu"),
        ("packed backward grad_out on meta", lambda: packed_bwd(go=meta(packed_out)), r"qkv.attention_qkvpacked_backward: grad_out must be a Float tensor of shape \[2, 3, 5, 8\] on cpu; got .* on meta"),
        ("packed backward grad_out float64", lambda: packed_bwd(go=packed_out.double()), r"qkv.attention_qkvpacked_backward: grad_out must be a Float tensor .*Double"),
        ("packed backward out on meta", lambda: packed_bwd(o=meta(packed_out)), r"qkv.attention_qkvpacked_backward: out must be a Float tensor .* on meta"),
        ("packed backward logsumexp on meta", lambda: packed_bwd(l=meta(packed_lse)), r"qkv.attention_qkvpacked_backward: logsumexp must be a Float tensor of shape \[2, 3, 5\] on cpu"),
        ("packed backward bias on meta", lambda: packed_bwd(bias=meta(torch.zeros(5, 5))), r"qkv.attention_qkvpacked_backward: bias must be on the query's device"),
        ("weights logsumexp on meta", lambda: weights(l=meta(lse)), r"qkv.attention_weights: logsumexp must be a Float tensor .* on meta"),
        ("weights logsumexp float16", lambda: weights(l=lse.half()), r"logsumexp must be a Float tensor .*Half"),
        ("weights backward grad_weights on meta", lambda: wbwd(gw=meta(g)), r"qkv.attention_weights_backward: grad_weights must be a Float tensor of shape \[2, 3, 5, 7\] on cpu; got .* on meta"),
        ("weights backward grad_weights float64", lambda: wbwd(gw=g.double()), r"grad_weights must be a Float tensor .*Double"),
        ("weights backward grad_weights shape", lambda: wbwd(gw=g[..., :6]), r"grad_weights must be a Float tensor of shape \[2, 3, 5, 7\] .*\[2, 3, 5, 6\]"),
        ("weights backward logsumexp on meta", lambda: wbwd(l=meta(lse)), r"qkv.attention_weights_backward: logsumexp must be"),
        ("mha in_proj_weight on meta", lambda: mha(in_w=meta(w(24, 8))), r"qkv.multi_head_attention: in_proj_weight must be on the input's device cpu"),
        ("mha in_proj_bias on meta", lambda: mha(in_b=meta(w(24))), r"qkv.multi_head_attention: in_proj_bias must be on the input's device"),
        ("mha out_proj_weight on meta", lambda: mha(out_w=meta(w(8, 8))), r"qkv.multi_head_attention: out_proj_weight must be on the input's device"),
        ("mha out_proj_bias on meta", lambda: mha(out_b=meta(w(8))), r"qkv.multi_head_attention: out_proj_bias must be on the input's device"),
        ("mha attn_bias on meta", lambda: mha(bias=meta(torch.zeros(4, 4))), r"qkv.multi_head_attention: attn_bias must be on the input's device"),
        ("cross memory on meta", lambda: cross(m=meta(mem)), r"qkv.cross_attention: memory must be on the input's device"),
        ("cross q_proj_weight on meta", lambda: cross(wq=meta(w(8, 8))), r"qkv.cross_attention: q_proj_weight must be on the input's device"),
        ("cross attn_bias on meta", lambda: cross(bias=meta(torch.zeros(4, 6))), r"qkv.cross_attention: attn_bias must be on the input's device"),
    ]


@pytest.mark.parametrize("case", bad_argument_cases(), ids=lambda case: case[0])
def test_every_tensor_argument_is_checked(case):
    _, call, message = case
    with pytest.raises(RuntimeError, match=message):
        call()


def test_the_python_layer_draws_seeds_of_the_contract():
    from qkv._attention_bias import draw_dropout_seed
    seed = draw_dropout_seed()
    assert (seed.dim(), seed.dtype, seed.device) == (0, torch.int64, torch.device("cpu"))
