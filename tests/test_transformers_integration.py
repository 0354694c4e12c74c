"""qkv as a Hugging Face transformers attention implementation (qkv.integrations.transformers).

Small randomly initialised models (no downloads), each built twice from one seed, with
attn_implementation="qkv" and with a reference implementation, compared on logits, parameter
gradients and greedy generation. `make test` installs the pinned transformers and sets
QKV_REQUIRE_TRANSFORMERS=1, so there this file fails, never skips, when transformers is missing.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

if os.environ.get("QKV_REQUIRE_TRANSFORMERS") == "1":
    import transformers
else:
    transformers = pytest.importorskip("transformers")

from transformers import AttentionInterface, AutoModelForCausalLM, Gemma2Config, LlamaConfig, MistralConfig  # noqa: E402

import qkv.integrations.transformers as qkv_hf  # noqa: E402

qkv_hf.register()

VOCAB, SEQ = 97, 12
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def llama() -> LlamaConfig:
    return LlamaConfig(**SMALL)


def mistral() -> MistralConfig:
    return MistralConfig(**SMALL, sliding_window=5)  # shorter than SEQ: the window matters


def gemma2() -> Gemma2Config:
    # Alternating sliding (5) and full layers, scores softcapped at 0.2 (about the size of the
    # random model's scores, so the cap changes them): the reference is eager,
    # since transformers' sdpa drops the softcap.
    return Gemma2Config(**SMALL, head_dim=16, sliding_window=5, attn_logit_softcapping=0.2,
                        final_logit_softcapping=None, query_pre_attn_scalar=16)


CONFIGS = {"llama": llama, "mistral": mistral}


def twin_models(config, reference: str, dtype: torch.dtype):
    """The same random weights under the reference implementation and under qkv. Each gets its
    own config: from_config writes the implementation into the config it is given."""
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=reference, dtype=dtype)
    ours = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="qkv", dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    assert ref.config._attn_implementation == reference and ours.config._attn_implementation == "qkv"
    return ref, ours


def padded_batch(left_padding: bool = True):
    """Three sequences of SEQ slots: full, left-padded by 4 (generation's padding side) or
    right-padded, and right-padded by 3."""
    ids = torch.randint(0, VOCAB, (3, SEQ))
    mask = torch.ones(3, SEQ, dtype=torch.long)
    if left_padding:
        mask[1, :4] = 0
    else:
        mask[1, SEQ - 4:] = 0
    mask[2, SEQ - 3:] = 0
    return ids, mask


def loss_logits_grads(model, ids, mask):
    model.train()  # the configs' attention dropout is 0: training mode, deterministic
    model.zero_grad()
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads


def assert_models_agree(ref, ours, ids, mask, atol, rtol):
    ref_loss, ref_logits, ref_grads = loss_logits_grads(ref, ids, mask)
    loss, logits, grads = loss_logits_grads(ours, ids, mask)
    real = mask.bool()  # padded slots' outputs are not compared (each library fills them its own way)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[real], ref_logits[real], atol=atol, rtol=rtol)
    torch.testing.assert_close(loss, ref_loss, atol=atol, rtol=rtol)
    assert grads.keys() == ref_grads.keys() and any("self_attn" in name for name in grads)
    for name, want in ref_grads.items():
        assert want.abs().sum() > 0, f"{name}: no gradient to compare"
        torch.testing.assert_close(grads[name], want, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_logits_and_gradients_match_sdpa(name, dtype, padding):
    ref, ours = twin_models(CONFIGS[name](), "sdpa", dtype)
    ids, mask = padded_batch(left_padding=padding == "left")
    if padding == "none":
        mask = torch.ones_like(mask)
    tol = 2e-5 if dtype == torch.float32 else 1e-10
    assert_models_agree(ref, ours, ids, mask, atol=tol, rtol=tol)


@pytest.mark.parametrize("padding", ["none", "right"])
def test_softcap_and_alternating_windows_match_eager(padding):
    # eager takes its softmax in float32 even for float64 models: hence 1e-6. Right padding only:
    # eager's left-padded rows see no key and give NaN that leaks into later layers.
    ref, ours = twin_models(gemma2(), "eager", torch.float64)
    ids, mask = padded_batch(left_padding=False)
    if padding == "none":
        mask = torch.ones_like(mask)
    assert_models_agree(ref, ours, ids, mask, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_generation_with_kv_cache_gives_identical_tokens(name, cache):
    """Left-padded prompts, 10 new tokens with the KV cache: past Mistral's window, the dynamic
    cache keeps only the window's keys (the compact mask path); a static cache takes sdpa's mask."""
    ref, ours = twin_models(CONFIGS[name](), "sdpa", torch.float32)
    ids, mask = padded_batch(left_padding=True)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    ref.eval(), ours.eval()
    with torch.no_grad():
        want = ref.generate(ids, **kwargs)
        got = ours.generate(ids, **kwargs)
    assert got.shape == (3, SEQ + 10)
    assert torch.equal(got, want)


@pytest.fixture
def attention_calls(monkeypatch):
    """Every call of qkv's attention function: (key heads, mask) as the layers passed them."""
    calls = []

    def spy(module, query, key, value, attention_mask, *args, **kwargs):
        calls.append((query.size(1), key.size(1), attention_mask))
        return qkv_hf.qkv_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "qkv", spy)
    return calls


def test_grouped_heads_arrive_unrepeated_and_padding_as_a_key_mask(attention_calls):
    _, ours = twin_models(mistral(), "sdpa", torch.float32)
    ids, mask = padded_batch()
    ours(input_ids=ids, attention_mask=mask)
    ours(input_ids=ids)
    assert len(attention_calls) == 4
    for q_heads, k_heads, _ in attention_calls:
        assert (q_heads, k_heads) == (4, 2)  # read in place by the kernel: no repeat_kv
    padded, unpadded = attention_calls[0][2], attention_calls[2][2]
    # The window and causality are the kernel's: the layers get only the (batch, keys) padding.
    assert padded.dtype == torch.bool and padded.shape == (3, SEQ) and torch.equal(padded, mask.bool())
    assert unpadded is None


def test_other_patterns_get_sdpas_full_mask():
    """A static cache (queries not the last keys) gets a (B, 1, L, S) mask, not the compact one."""
    from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

    pad = torch.ones(2, 6, dtype=torch.bool)
    pad[0, :2] = False
    compact = qkv_hf.qkv_mask(2, 6, 6, 0, 0, causal_mask_function, pad)
    assert torch.equal(compact, pad)
    assert qkv_hf.qkv_mask(2, 6, 6, 0, 0, sliding_window_causal_mask_function(3), pad).shape == (2, 6)
    full = qkv_hf.qkv_mask(2, 6, 10, 0, 0, causal_mask_function, pad)  # static cache: 4 empty slots
    assert full.shape == (2, 1, 6, 10) and not full[:, :, :, 6:].any()
    overlay = qkv_hf.qkv_mask(2, 6, 6, 0, 0, causal_mask_function, pad, allow_is_causal_skip=False)
    assert overlay.shape == (2, 1, 6, 6)


def test_transformers_is_the_pinned_version():
    """The Makefile's pin is what these tests ran against (a new transformers may change the
    attention-function contract: bump the pin on purpose, with these tests)."""
    pinned = os.environ.get("QKV_TRANSFORMERS_VERSION")
    if pinned is None:
        pytest.skip("QKV_TRANSFORMERS_VERSION is set by make test")
    assert transformers.__version__ == pinned


def test_bad_inputs_name_the_problem():
    q, k = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match=r"2-D attention_mask must be \(batch, key_len\) = \(2, 6\); got \(2, 5\)"):
        qkv_hf.qkv_attention_forward(module, q, k, k, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="position_bias"):
        qkv_hf.qkv_attention_forward(module, q, k, k, None, position_bias=torch.zeros(1, 4, 6, 6))


def test_an_integer_key_padding_mask_means_what_a_bool_one_does():
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    tokens = torch.ones(2, 6, dtype=torch.long)
    tokens[0, :2] = 0
    module = torch.nn.Module()
    want, _ = qkv_hf.qkv_attention_forward(module, q, k, v, tokens.bool())
    got, _ = qkv_hf.qkv_attention_forward(module, q, k, v, tokens)
    torch.testing.assert_close(got, want)
    # Causal: queries 0 and 1 of sequence 0 see only padding, so they output zeros.
    assert torch.equal(want[0, :2], torch.zeros_like(want[0, :2]))
