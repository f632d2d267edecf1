"""famtune's kernels: LoRA dropout from 16-bit draws, half-precision 4-bit matmuls through fp32 kernels,
and the loss over supervised positions only. Each is checked against the computation it replaces."""

from __future__ import annotations

import pytest
import torch

from famtune import kernels
from famtune.errors import FamtuneError
from famtune.loss import causal_lm_loss


def test_lora_dropout_drops_at_rate_p_and_keeps_the_expectation():
    drop = kernels.lora_dropout(0.05).train()
    x = torch.ones(1000, 1000)
    torch.manual_seed(0)
    y = drop(x)
    dropped = float((y == 0).float().mean())
    assert abs(dropped - 0.05) < 0.002, dropped
    assert abs(float(y.mean()) - 1.0) < 0.005
    kept = y[y != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 65536 / (65536 - round(0.05 * 65536))))
    # every one of the 16 bits is used: rates far from 1/2 would show a stuck bit
    for p in (0.5, 0.25, 0.001):
        rate = float((kernels.lora_dropout(p).train()(x) == 0).float().mean())
        assert abs(rate - p) < 4 * (p * (1 - p) / x.numel()) ** 0.5 + 1e-4, (p, rate)


def test_lora_dropout_is_reproducible_and_off_in_eval():
    drop = kernels.lora_dropout(0.3).train()
    x = torch.randn(7, 33, dtype=torch.bfloat16)
    torch.manual_seed(1)
    a = drop(x)
    torch.manual_seed(1)
    b = drop(x)
    assert torch.equal(a, b) and a.dtype == x.dtype and a.shape == x.shape
    assert not torch.equal(a, drop(x))
    assert drop.eval()(x) is x
    with pytest.raises(ValueError):
        kernels.lora_dropout(1.0)


def test_fast_lora_dropout_replaces_every_peft_dropout():
    from peft import LoraConfig, get_peft_model

    base = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.1, target_modules=["0", "2"]))
    assert kernels.use_fast_lora_dropout(model) == 2
    drops = [m for m in model.modules() if type(m).__name__ == "LoraDropout"]
    assert len(drops) == 2 and all(d.p == 0.1 for d in drops)
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())


def _nf4_linear(bias: bool):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    dense = torch.nn.Linear(96, 160, bias=bias)
    layer = bnb.nn.Linear4bit(
        96, 160, bias=bias, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True
    )
    layer.load_state_dict(dense.state_dict())
    layer = layer.to("cpu")  # quantizes
    layer.support_avx512bf16_for_cpu = False
    return layer


@pytest.mark.parametrize("bias", [False, True])
def test_widened_4bit_matmul_is_the_bf16_matmul(bias):
    native = _nf4_linear(bias)
    widened = _nf4_linear(bias)
    assert kernels.widen_4bit_matmuls(torch.nn.Sequential(widened)) == 1
    x = torch.randn(4, 37, 96)
    outs, grads = [], []
    for layer in (native, widened):
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        (y * torch.linspace(-1, 1, 160)).sum().backward()
        outs.append(y.detach())
        grads.append(xi.grad)
    assert outs[0].dtype == outs[1].dtype == torch.float32
    # the same bf16 products with fp32 accumulation: equal up to the summation order, i.e. one bf16
    # rounding step on a few elements
    for a, b in ((outs[0], outs[1]), (grads[0], grads[1])):
        assert float((a == b).float().mean()) > 0.99
        torch.testing.assert_close(a, b, rtol=2**-7, atol=1e-3)


def test_half_matmul_setting():
    cpu = torch.device("cpu")
    assert kernels.resolve_half_matmul("native", cpu, torch.bfloat16)[0] is False
    widen, why = kernels.resolve_half_matmul("fp32", cpu, torch.bfloat16)
    assert widen and "GFLOP/s" in why
    assert kernels.resolve_half_matmul("auto", cpu, torch.float32)[0] is False
    with pytest.raises(FamtuneError, match="half_matmul"):
        kernels.resolve_half_matmul("fast", cpu, torch.bfloat16)


def _tiny_lm(seed=0):
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=101,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_cache=False,
        attn_implementation="sdpa",
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _batch():
    torch.manual_seed(3)
    ids = torch.randint(1, 101, (3, 20))
    labels = ids.clone()
    labels[:, :8] = -100
    labels[1, 12:] = -100
    labels[2] = -100
    labels[2, 5:9] = ids[2, 5:9]
    mask = torch.ones_like(ids)
    mask[1, 16:] = 0
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def test_supervised_only_loss_equals_the_models_loss_and_gradients():
    model = _tiny_lm()
    batch = _batch()
    n = int((batch["labels"][:, 1:] != -100).sum())
    ours = causal_lm_loss(model, batch, n)
    ours.backward()
    ours_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    theirs = model(**batch, num_items_in_batch=torch.tensor(n)).loss
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    for a, p in zip(ours_grads, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-7)


class _HeadBypassingLM(torch.nn.Module):
    """A causal LM that computes its logits from the head's weight without calling the head module."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def get_output_embeddings(self):
        return self.inner.lm_head

    def forward(self, **kw):
        hidden = self.inner.model(**kw).last_hidden_state
        return type("Out", (), {"logits": torch.nn.functional.linear(hidden, self.inner.lm_head.weight)})()


def test_loss_falls_back_to_full_logits_when_the_head_is_bypassed():
    inner = _tiny_lm()
    batch = _batch()
    n = int((batch["labels"][:, 1:] != -100).sum())
    expected = inner(**batch, num_items_in_batch=torch.tensor(n)).loss
    torch.testing.assert_close(causal_lm_loss(_HeadBypassingLM(inner), batch, n), expected, rtol=1e-6, atol=1e-6)


def test_lora_dropout_gradient_is_the_mask_times_the_scale():
    drop = kernels.lora_dropout(0.2).train()
    x = torch.randn(64, 48, requires_grad=True)
    torch.manual_seed(5)
    y = drop(x)
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    kept = y.detach() != 0
    torch.testing.assert_close(x.grad, weights * kept * drop.scale)
    torch.testing.assert_close(y.detach(), x.detach() * kept * drop.scale)


def test_fused_chunked_head_loss_is_used_and_equals_the_models_loss(monkeypatch):
    from famtune import loss as loss_mod

    model = _tiny_lm(seed=1)
    model.lm_head.weight.requires_grad_(False)  # frozen, as under LoRA
    batch = _batch()
    n = int((batch["labels"][:, 1:] != -100).sum())
    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", 101 * 3)  # three rows per chunk
    ours = causal_lm_loss(model, batch, n)
    assert loss_mod._FUSABLE[model] is True
    ours.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for p in model.parameters():
        p.grad = None
    theirs = model(**batch, num_items_in_batch=torch.tensor(n)).loss
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    for k, p in model.named_parameters():
        if k.startswith("lm_head"):
            continue  # the fused loss never computes the frozen head's gradient
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_head_loss_equals_cross_entropy_for_each_head_dtype_and_bias(monkeypatch, dtype, with_bias):
    """Every chunk (the last one shorter) through the shared logits buffer gives the loss and the
    hidden-state gradient of the plain head + cross-entropy."""
    from famtune import loss as loss_mod

    dtype = getattr(torch, dtype)
    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", 37 * 4)  # four rows per chunk, 11 rows: 4 + 4 + 3
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(37, 16, generator=gen).to(dtype)
    bias = torch.randn(37, generator=gen).to(dtype) if with_bias else None
    hidden = torch.randn(11, 16, generator=gen).to(dtype).requires_grad_(True)
    targets = torch.randint(0, 37, (11,), generator=gen)
    num = torch.tensor(7.0)
    ours = loss_mod._fused_head_loss_class().apply(hidden, weight, bias, targets, num)
    (grad_ours,) = torch.autograd.grad(ours, hidden)
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    theirs = torch.nn.functional.cross_entropy(logits, targets, reduction="sum") / num
    (grad_theirs,) = torch.autograd.grad(theirs, hidden)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(ours, theirs, **tol)
    assert grad_ours.dtype == hidden.dtype
    torch.testing.assert_close(grad_ours, grad_theirs, **tol)


def test_a_head_whose_logits_the_model_rescales_is_not_fused():
    import transformers

    from famtune import loss as loss_mod

    class HalvedLogits(transformers.Qwen2ForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    inner = _tiny_lm(seed=2)
    model = HalvedLogits(inner.config)
    model.load_state_dict(inner.state_dict())
    for p in model.lm_head.parameters():
        p.requires_grad_(False)
    batch = _batch()
    n = int((batch["labels"][:, 1:] != -100).sum())
    ours = causal_lm_loss(model, batch, n)
    assert loss_mod._FUSABLE[model] is False
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = (
        torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, 101), batch["labels"][:, 1:].reshape(-1), reduction="sum"
        )
        / n
    )
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


def test_fusion_check_leaves_the_random_stream_alone_and_sees_through_dropout():
    import transformers

    from famtune import loss as loss_mod

    config = transformers.Qwen2Config(
        vocab_size=101,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_cache=False,
        attn_implementation="eager",
        attention_dropout=0.3,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).train()
    model.lm_head.weight.requires_grad_(False)
    batch = _batch()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    torch.manual_seed(7)
    assert loss_mod._fusable(model, model.lm_head, inputs) is True
    after = torch.rand(4)
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(4))
