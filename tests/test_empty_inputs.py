"""Empty batches and sequences (N, L or S = 0) through every public entry point, forward and
backward, against torch: torch returns empty outputs (and with S = 0 outputs that attended to
nothing: the out-projection's bias), weights of shape (N, L, 0)-like, and zero gradients.
Sequence-first MHA with N or L = 0, and the SDPA twin with three or more batch dimensions, a
mask and L or S = 0, used to raise "cannot reshape tensor of 0 elements"."""
import pytest
import torch
import torch.nn.functional as F

import qkv

E, H = 8, 2
SIZES = [(0, 3, 4), (2, 0, 4), (2, 3, 0), (0, 0, 0)]  # (N, L, S)


def assert_outputs_and_grads_match(run_qkv, run_torch, inputs, qkv_params=(), torch_params=()):
    """Both runs on the same inputs: same outputs (None where torch gives None), and the same
    gradients of every input and of corresponding parameters (an unused one counts as zero)."""
    got, want = run_qkv(), run_torch()
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if w is not None:
            assert g.shape == w.shape
            torch.testing.assert_close(g, w)

    def grads(outs, params):
        leaves = [*inputs, *params]
        loss = sum(o.sum() for o in outs if o is not None)
        return [torch.zeros_like(t) if g is None else g
                for t, g in zip(leaves, torch.autograd.grad(loss, leaves, allow_unused=True))]

    for g, w in zip(grads(got, qkv_params), grads(want, torch_params), strict=True):
        torch.testing.assert_close(g, w)


def paired_mha(**kwargs):
    torch_mha = torch.nn.MultiheadAttention(E, H, **kwargs)
    qkv_mha = qkv.MultiheadAttention(E, H, **kwargs)
    qkv_mha.load_state_dict(torch_mha.state_dict())
    with torch.no_grad():  # non-zero projection biases, so an output of "bias only" is visible
        for m in (torch_mha, qkv_mha):
            m.in_proj_bias.copy_(torch.linspace(-1, 1, 3 * E))
            m.out_proj.bias.copy_(torch.linspace(1, 2, E))
    return qkv_mha, torch_mha


def seq(n, length, features, batch_first):
    shape = (n, length, features) if batch_first else (length, n, features)
    return torch.randn(shape, requires_grad=True)


@pytest.mark.parametrize("N,L,S", SIZES)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_multihead_attention(N, L, S, batch_first, need_weights, with_mask):
    qkv_mha, torch_mha = paired_mha(batch_first=batch_first)
    q, kv = seq(N, L, E, batch_first), seq(N, S, E, batch_first)
    masks = {}
    if with_mask:  # masks that hide nothing: torch's own function fails on them at N = 0, so it runs without
        masks = dict(key_padding_mask=torch.zeros(N, S, dtype=torch.bool), attn_mask=torch.zeros(L, S, dtype=torch.bool))
    assert_outputs_and_grads_match(lambda: qkv_mha(q, kv, kv, need_weights=need_weights, **masks),
                                   lambda: torch_mha(q, kv, kv, need_weights=need_weights), (q, kv),
                                   list(qkv_mha.parameters()), list(torch_mha.parameters()))


@pytest.mark.parametrize("N,L,S", SIZES)
def test_functional_multi_head_attention_forward(N, L, S):
    qkv_mha, _ = paired_mha()
    q, k, v = seq(N, L, E, False), seq(N, S, E, False), seq(N, S, E, False)
    args = (E, H, qkv_mha.in_proj_weight, qkv_mha.in_proj_bias, None, None, False, 0.0, qkv_mha.out_proj.weight,
            qkv_mha.out_proj.bias)
    assert_outputs_and_grads_match(lambda: qkv.functional.multi_head_attention_forward(q, k, v, *args),
                                   lambda: F.multi_head_attention_forward(q, k, v, *args), (q, k, v))


@pytest.mark.parametrize("N,L", [(0, 3), (2, 0), (0, 0)])
@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_modules(N, L, causal):
    module = (qkv.CausalSelfAttention if causal else qkv.SelfAttention)(E, H)
    reference = torch.nn.MultiheadAttention(E, H, batch_first=True)
    reference.load_state_dict(module.state_dict())
    x = seq(N, L, E, True)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(L) if causal else None
    assert_outputs_and_grads_match(lambda: (module(x),), lambda: (reference(x, x, x, attn_mask=mask)[0],), (x,),
                                   list(module.parameters()), list(reference.parameters()))


@pytest.mark.parametrize("N,L,S", SIZES)
def test_cross_attention_module(N, L, S):
    module = qkv.CrossAttention(E, H, kdim=6, vdim=6)
    reference = torch.nn.MultiheadAttention(E, H, kdim=6, vdim=6, batch_first=True)
    reference.load_state_dict(module.state_dict())
    x, memory = seq(N, L, E, True), seq(N, S, 6, True)
    assert_outputs_and_grads_match(lambda: (module(x, memory),),
                                   lambda: (reference(x, memory, memory, need_weights=False)[0],), (x, memory),
                                   list(module.parameters()), list(reference.parameters()))


@pytest.mark.parametrize("batch", [(2,), (2, 3), (2, 3, 2), (1, 2, 3, 2)], ids=lambda b: f"{len(b)}batchdims")
@pytest.mark.parametrize("L,S", [(0, 5), (4, 0), (0, 0)])
@pytest.mark.parametrize("mask", [None, "bool", "float", "broadcast bool"])
def test_scaled_dot_product_attention(batch, L, S, mask):
    q = torch.randn(*batch, L, 8, requires_grad=True)
    k, v = torch.randn(*batch, S, 8, requires_grad=True), torch.randn(*batch, S, 6, requires_grad=True)
    attn_mask = {
        None: None,
        "bool": torch.ones(*batch, L, S, dtype=torch.bool),
        "float": torch.randn(*batch, L, S),
        "broadcast bool": torch.ones(batch[-1], 1, S, dtype=torch.bool),
    }[mask]
    assert_outputs_and_grads_match(lambda: (qkv.functional.scaled_dot_product_attention(q, k, v, attn_mask),),
                                   lambda: (F.scaled_dot_product_attention(q, k, v, attn_mask),), (q, k, v))
