"""Dropout inside the core op: statistics, scaling, determinism, replay by the weights op."""
import pytest
import torch

from reference import dropout_seed, reference_probs, tolerance

pytestmark = pytest.mark.usefixtures("device")  # cpu, and cuda when present (conftest.py)

attention = torch.ops.qkv.attention
attention_weights = torch.ops.qkv.attention_weights

# Every test runs on each copy of the CPU kernels this CPU has (conftest.cpu_capability).
pytestmark = pytest.mark.usefixtures("cpu_capability")


def inputs(L=64, S=96, D=16, dtype=torch.float64):
    return (torch.randn(2, 4, L, D, dtype=dtype), torch.randn(2, 4, S, D, dtype=dtype),
            torch.randn(2, 4, S, D, dtype=dtype))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropped_fraction_and_scaling(p):
    q, k, v = inputs()
    seed = dropout_seed(99)
    _, lse = attention(q, k, v, None, p, False, False, None, seed)
    weights = attention_weights(q, k, None, lse, p, False, False, None, seed)
    probs = reference_probs(q, k)
    kept = weights != 0
    n = kept.numel()
    dropped = 1 - kept.double().mean().item()
    assert abs(dropped - p) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-3, dropped
    torch.testing.assert_close(weights[kept], probs[kept] / (1 - p), **tolerance(torch.float64))


def test_output_uses_the_returned_weights():
    q, k, v = inputs()
    seed = dropout_seed(5)
    out, lse = attention(q, k, v, None, 0.3, True, False, None, seed)
    weights = attention_weights(q, k, None, lse, 0.3, True, False, None, seed)
    torch.testing.assert_close(weights @ v, out, **tolerance(torch.float64))


def test_same_seed_same_result_different_seed_different_result():
    q, k, v = inputs(dtype=torch.float32)
    a = attention(q, k, v, None, 0.2, False, False, None, dropout_seed(1))[0]
    b = attention(q, k, v, None, 0.2, False, False, None, dropout_seed(1))[0]
    c = attention(q, k, v, None, 0.2, False, False, None, dropout_seed(2))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.cpu_only("thread counts steer the CPU kernels")
def test_mask_does_not_depend_on_thread_count():
    q, k, v = inputs(L=130, S=200, dtype=torch.float32)
    seed = dropout_seed(3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = attention(q, k, v, None, 0.4, False, False, None, seed)[0]
        torch.set_num_threads(max(2, threads))
        many = attention(q, k, v, None, 0.4, False, False, None, seed)[0]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_without_seed_the_global_generator_decides():
    q, k, v = inputs(dtype=torch.float32)
    torch.manual_seed(11)
    a = attention(q, k, v, None, 0.5)[0]
    torch.manual_seed(11)
    b = attention(q, k, v, None, 0.5)[0]
    assert torch.equal(a, b)


def test_backward_replays_the_forward_mask():
    # Autograd draws one seed for forward and backward when none is given.
    q, k, v = (t.requires_grad_() for t in inputs(L=8, S=10, D=4))
    torch.manual_seed(4)
    out, _ = attention(q, k, v, None, 0.5)
    grad_v = torch.autograd.grad(out.sum(), v)[0]
    torch.manual_seed(4)
    seed = torch.randint(0, 2**62, (), dtype=torch.int64, device="cpu")  # as the op draws it
    _, lse = attention(q, k, v, None, 0.5, False, False, None, seed)
    weights = attention_weights(q, k, None, lse, 0.5, False, False, None, seed)
    torch.testing.assert_close(grad_v, weights.sum(-2).unsqueeze(-1).expand_as(v), **tolerance(torch.float64))


def test_dropout_one_drops_everything():
    q, k, v = inputs(dtype=torch.float32)
    out, _ = attention(q, k, v, None, 1.0, False, False, None, dropout_seed(0))
    assert (out == 0).all()
