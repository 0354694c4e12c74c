import torch, qkv  # noqa: F401
for d in (64, 96, 128, 256):
    q, k, v = (torch.randn(1, 2, 200, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    for causal in (False, True):
        out = torch.ops.qkv.attention(q, k, v, None, 0.0, causal, True)[0]
        torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
torch.cuda.synchronize()
print("race case done")
