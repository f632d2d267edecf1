"""Varlen attention for packed rows (famtune.attention): per-sample attention gives each packed
sample the logits, loss and gradients it has alone, for every packing family's architecture; a
model that cannot use it keeps the dense block-diagonal mask."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_packing import NATIVE_ARCH, packing_families, random_samples, tiny_native_model

from famtune import attention
from famtune.checkpoint import open_checkpoint
from famtune.errors import FamtuneError
from famtune.loss import causal_lm_loss
from famtune.packing import collate_packed
from famtune.plugins import Family, get_plugins
from famtune.train import collate

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "reference"
CPU = torch.device("cpu")
# rows of 4, 2 and 1 samples: a one-token sample, a padded tail, a row that is one sample
LENGTHS = [9, 17, 1, 5, 30, 4, 11]
ROWS = [[0, 1, 2, 3], [4, 5], [6]]


def packed_batch(samples, boundaries: bool):
    return collate_packed([[samples[i] for i in row] for row in ROWS], pad_id=0, device=CPU, boundaries=boundaries)


def inputs_of(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


@pytest.fixture(scope="module", params=sorted({NATIVE_ARCH[f.name] for f in packing_families()}))
def varlen_model(request):
    model = tiny_native_model(request.param)
    path = attention.choose(model, True, CPU, "fp32")
    assert path.path == "varlen-sdpa", path
    assert model.config._attn_implementation == attention.VARLEN_SDPA
    return model


def test_boundaries_cover_each_sample_and_each_padded_tail():
    samples = random_samples(LENGTHS)
    batch = packed_batch(samples, boundaries=True)
    width = batch["input_ids"].shape[1]
    assert width == 34
    # row 0: 9+17+1+5 = 32 and a 2-token tail; row 1: 30+4 = 34, full; row 2: 11 and a 23-token tail
    expected = [0, 9, 26, 27, 32, 34, 64, 68, 79, 102]
    assert batch["cu_seq_lens_q"].tolist() == expected and batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["cu_seq_lens_k"].tolist() == expected
    assert batch["max_length_q"] == batch["max_length_k"] == 30
    # the same cuts as the restarting position ids
    starts = (batch["position_ids"].reshape(-1) == 0).nonzero().reshape(-1).tolist()
    assert starts + [len(ROWS) * width] == expected
    assert "cu_seq_lens_q" not in packed_batch(samples, boundaries=False)


def test_packed_logits_and_loss_equal_each_sample_alone(varlen_model):
    model = varlen_model
    samples = random_samples(LENGTHS)
    batch = packed_batch(samples, boundaries=True)
    with torch.no_grad():
        packed = model(**inputs_of(batch)).logits
        for r, row in enumerate(ROWS):
            at = 0
            for i in row:
                n = len(samples[i].input_ids)
                alone = model(input_ids=torch.tensor([samples[i].input_ids])).logits[0]
                torch.testing.assert_close(packed[r, at : at + n], alone, rtol=0, atol=1e-5)
                at += n
        ours = causal_lm_loss(model, batch, 1)
        unpacked = causal_lm_loss(model, collate(samples, 0, CPU), 1)
    torch.testing.assert_close(ours, unpacked, rtol=1e-5, atol=1e-4)


def test_packed_gradients_equal_the_unpacked_run_with_checkpointing(varlen_model):
    """Training as famtune does: gradient checkpointing recomputes each layer in the backward pass,
    which must see the same sample boundaries; loss and every gradient match the unpacked run
    (the same samples padded to the longest, with an attention mask)."""
    model = varlen_model
    samples = random_samples(LENGTHS, seed=1)
    n_items = sum(sum(label != -100 for label in s.labels[1:]) for s in samples)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        model.zero_grad()
        packed_loss = causal_lm_loss(model, packed_batch(samples, boundaries=True), n_items)
        packed_loss.backward()
        packed_grads = [p.grad.clone() for p in params]
        model.zero_grad()
        alone_loss = causal_lm_loss(model, collate(samples, 0, CPU), n_items)
        alone_loss.backward()
        alone_grads = [p.grad.clone() for p in params]
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
        model.zero_grad()
    torch.testing.assert_close(packed_loss, alone_loss, rtol=1e-5, atol=1e-5)
    for (name, _), got, want in zip(model.named_parameters(), packed_grads, alone_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_sliding_window_stays_inside_the_sample():
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=6,
        max_window_layers=0,
        use_cache=False,
        attn_implementation="sdpa",
        initializer_range=0.3,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    assert attention.choose(model, True, CPU, "fp32").path == "varlen-sdpa"
    samples = random_samples([4, 20, 13])
    batch = collate_packed([samples], pad_id=0, device=CPU, boundaries=True)
    with torch.no_grad():
        packed = model(**inputs_of(batch)).logits[0]
        at = 0
        for s in samples:
            n = len(s.input_ids)
            alone = model(input_ids=torch.tensor([s.input_ids])).logits[0]
            torch.testing.assert_close(packed[at : at + n], alone, rtol=0, atol=1e-5)
            at += n


def test_forced_fallback_keeps_the_dense_mask_and_the_same_logits(monkeypatch):
    monkeypatch.setenv(attention.FORCE_ENV, "mask")
    model = tiny_native_model("qwen2")
    path = attention.choose(model, True, CPU, "fp32")
    assert path.as_dict() == {"path": "block-diagonal-mask", "why": "FAMTUNE_PACKED_ATTENTION=mask"}
    assert not path.wants_boundaries and model.config._attn_implementation == "sdpa"
    samples = random_samples(LENGTHS)
    with torch.no_grad():
        dense = model(**inputs_of(packed_batch(samples, boundaries=False))).logits
        monkeypatch.delenv(attention.FORCE_ENV)
        assert attention.choose(model, True, CPU, "fp32").path == "varlen-sdpa"
        varlen = model(**inputs_of(packed_batch(samples, boundaries=True))).logits
    torch.testing.assert_close(varlen, dense, rtol=0, atol=1e-5)
    assert attention.choose(model, False, CPU, "fp32").path == "padded"


def test_model_with_its_own_attention_falls_back_to_the_dense_mask():
    # Baichuan2-13B's ALiBi model has its own attention code, not transformers' AttentionInterface
    model = open_checkpoint(str(REFERENCE / "baichuan2_13b" / "tiny")).load_model(
        quantization="none", compute_dtype="fp32"
    )
    path = attention.choose(model, True, CPU, "fp32")
    assert path.path == "block-diagonal-mask" and "attention interface" in path.why
    assert not path.wants_boundaries


def test_boundaries_that_do_not_reach_attention_are_an_error():
    """A forward that carries boundaries but whose attention calls do not see them would leak
    across samples without a mask: the varlen attention refuses instead."""
    model = tiny_native_model("llama")
    attention.choose(model, True, CPU, "fp32")
    module = model.model.layers[0].self_attn
    q = torch.zeros(1, 4, 5, 8)
    token = attention._ACTIVE.set(attention._PackedForward())
    try:
        with pytest.raises(FamtuneError, match="boundaries did not reach the attention layers"):
            attention.varlen_sdpa_attention(module, q, q[:, :2], q[:, :2], None)
    finally:
        attention._ACTIVE.reset(token)
    # outside a packed forward, a call without boundaries is transformers' own SDPA
    out, _ = attention.varlen_sdpa_attention(module, q, q[:, :2], q[:, :2], None)
    assert out.shape == (1, 5, 4, 8)


def test_flash_attention_is_chosen_only_where_it_can_run():
    assert not attention.flash_attn_usable(CPU, "bf16")
    assert not attention.flash_attn_usable(torch.device("cuda"), "fp32")


def _tiny_packing_checkpoint(plugin: str, root: Path) -> Path:
    """A tiny checkpoint of the plugin's first packing family that can build one."""
    from famtune.demo import demo_corpus

    plugins = get_plugins()
    for name in plugins.families_of(plugin):
        family = Family(plugins, plugin, name)
        if family.supports_packing() and family.tiny_checkpoint(str(root / name), demo_corpus()):
            return root / name
    raise AssertionError(f"plugin {plugin} builds no tiny checkpoint of a packing family")


@pytest.mark.parametrize("plugin", ["qwen", "baichuan2", "internlm2", "chatglm"])
def test_builtin_family_checkpoint_trains_packed_rows_per_sample(plugin, tmp_path, monkeypatch):
    """The model each built-in plugin loads (converted to its native architecture) takes the
    varlen path, and its packed samples keep their logits alone."""
    monkeypatch.setenv("FAMTUNE_CACHE", str(tmp_path / "cache"))
    tiny = _tiny_packing_checkpoint(plugin, tmp_path)
    model = open_checkpoint(str(tiny)).load_model(quantization="none", compute_dtype="fp32")
    assert attention.choose(model, True, CPU, "fp32").path == "varlen-sdpa", tiny.name
    samples = random_samples([7, 12, 1, 9], vocab=min(97, model.config.vocab_size))
    batch = collate_packed([samples[:3], samples[3:]], pad_id=0, device=CPU, boundaries=True)
    with torch.no_grad():
        packed = model(**inputs_of(batch), use_cache=False).logits
        at = 0
        for s in samples[:3]:
            n = len(s.input_ids)
            alone = model(input_ids=torch.tensor([s.input_ids]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[0, at : at + n], alone, rtol=1e-5, atol=1e-5)
            at += n
