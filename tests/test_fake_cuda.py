"""Fake-tensor device propagation with CUDA inputs, checked without a GPU.

torch.compile and opcheck run every op on fake tensors, and FakeTensor works out the device of
each output from the inputs' devices: a tensor on the CPU beside CUDA inputs is accepted only
when it is 0-dim. The dropout seed is such a tensor (on a GPU machine a one-element 1-D seed
made opcheck fail with "found two different devices cuda:0, cpu"). Fake CUDA tensors need no
GPU: they are meta tensors that report a CUDA device. Each op runs on them here, through its
Meta (or composite) kernel, and its outputs must be fake CUDA tensors with exactly the shapes,
strides and dtypes of the real CPU kernel's outputs for the same inputs.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

ops = torch.ops.qkv
CUDA = torch.device("cuda", 0)


def fake_on(mode, t, device=CUDA):
    """A fake tensor with t's shape, strides and dtype on `device` (no memory, no GPU needed)."""
    meta = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
    fake = FakeTensor(mode, meta, torch.device(device))
    return fake.requires_grad_(t.requires_grad) if t.is_floating_point() else fake


def run_fake(call, args, seed_device="cpu"):
    """Runs call(*args) on fake CUDA copies of the tensor args (the seed, an int64 tensor, stays
    where seed_device says)."""
    mode = FakeTensorMode()
    fakes = [fake_on(mode, a, seed_device if a.dtype == torch.int64 else CUDA) if isinstance(a, torch.Tensor) else a
             for a in args]
    with mode:
        return call(*fakes)


def assert_same_layout_on_cuda(fake_outs, real_outs):
    fake_outs = fake_outs if isinstance(fake_outs, (tuple, list)) else (fake_outs,)
    real_outs = real_outs if isinstance(real_outs, (tuple, list)) else (real_outs,)
    assert len(fake_outs) == len(real_outs)
    for fake, real in zip(fake_outs, real_outs):
        assert isinstance(fake, FakeTensor) and fake.device == CUDA
        assert (fake.shape, fake.stride(), fake.dtype) == (real.shape, real.stride(), real.dtype)


def core_args(dtype=torch.float32):
    q = torch.randn(2, 5, 3, 8, dtype=dtype).transpose(1, 2)  # token-major, as projections give
    k, v = torch.randn(2, 3, 7, 8, dtype=dtype), torch.randn(2, 3, 7, 4, dtype=dtype)
    bias = torch.randn(3, 5, 7, dtype=dtype)
    return q, k, v, bias


SEED = torch.tensor(1234)


def op_cases(dtype):
    q, k, v, bias = core_args(dtype)
    out, lse = ops.attention(q, k, v, bias, 0.2, True, False, None, SEED)
    grad_w = torch.randn(2, 3, 5, 7, dtype=dtype)
    x, mem = torch.randn(2, 6, 16, dtype=dtype), torch.randn(2, 9, 12, dtype=dtype)
    w = lambda *s: torch.randn(*s, dtype=dtype) * 0.2
    qkv = torch.randn(5, 2, 3, 3, 8, dtype=dtype).permute(1, 0, 2, 3, 4)  # sequence-first, as MHA's projection gives
    packed_out, packed_lse = ops.attention_qkvpacked(qkv, bias[:, :, :5], 0.2, True, None, SEED)
    return {
        "attention": (ops.attention, (q, k, v, bias, 0.2, True, False, None, SEED)),
        "attention (no dropout)": (ops.attention, (q, k, v, None, 0.0, False, True, 0.5, None)),
        "attention_backward": (ops.attention_backward,
                               (torch.randn_like(out), q, k, v, bias, out, lse, 0.2, True, False, None, SEED, True)),
        "attention_weights": (ops.attention_weights, (q, k, bias, lse, 0.2, True, False, None, SEED)),
        "attention_weights (averaged)": (ops.attention_weights, (q, k, bias, lse, 0.2, True, False, None, SEED, True)),
        "attention_with_weights": (ops.attention_with_weights, (q, k, v, bias, 0.2, True, False, None, SEED, True)),
        "attention_weights_backward": (ops.attention_weights_backward,
                                       (grad_w, q, k, bias, lse, 0.2, True, False, None, SEED, True)),
        "attention_qkvpacked": (ops.attention_qkvpacked, (qkv, bias[:, :, :5], 0.2, True, None, SEED)),
        "attention_qkvpacked_backward": (ops.attention_qkvpacked_backward,
                                         (torch.randn_like(packed_out), qkv, bias[:, :, :5], packed_out, packed_lse,
                                          0.2, True, None, SEED, True)),
        "multi_head_attention": (ops.multi_head_attention,
                                 (x, x, x, 4, w(48, 16), w(48), w(16, 16), w(16), None, False, 0.2, SEED)),
        "masked_self_attention": (ops.masked_self_attention, (x, 2, w(48, 16), None, w(16, 16), None, None, 0.2, SEED)),
        "cross_attention": (ops.cross_attention,
                            (x, mem, 4, w(16, 16), w(16, 12), w(16, 12), w(48), w(16, 16), w(16), None, 0.2, SEED)),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(op_cases(torch.float32)))
def test_every_op_propagates_cuda_with_a_cpu_seed(name, dtype):
    op, args = op_cases(dtype)[name]
    assert_same_layout_on_cuda(run_fake(op, args), op(*args))


def test_the_old_one_element_seed_is_the_contract_error_not_a_device_mismatch():
    q, k, v, bias = core_args()
    with pytest.raises(RuntimeError, match=r"qkv.attention: dropout_seed must be a 0-dim int64 tensor on the CPU"):
        run_fake(ops.attention, (q, k, v, bias, 0.2, True, False, None, torch.tensor([1234])))


@pytest.mark.parametrize("name", ["attention", "attention_with_weights", "attention_qkvpacked", "multi_head_attention",
                                  "cross_attention"])
def test_a_seed_drawn_inside_the_call_propagates_too(name):
    # No seed given: the autograd layer (or the two-op path) draws one, a 0-dim CPU tensor too.
    # (Inputs that require grad cannot be faked on CUDA with a CPU-only torch: autograd asks
    # the CUDA device guard for the gradient's metadata. The backward ops are covered one by one
    # above, with the seed as the autograd layer passes it.)
    op, args = op_cases(torch.float32)[name]
    seed_position = max(i for i, a in enumerate(args) if a is SEED)
    args = args[:seed_position] + (None,) + args[seed_position + 1:]
    assert_same_layout_on_cuda(run_fake(op, args), op(*args))
