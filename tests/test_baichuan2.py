"""The Baichuan2 plugin against the original code's own outputs (../shared/fixtures/reference).

Both variants: 7B (RoPE, loaded as LlamaForCausalLM) and 13B (ALiBi, famtune's own model).
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from famtune.checkpoint import open_checkpoint
from famtune.encoding import IGNORE_INDEX
from famtune.errors import FamtuneError

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "reference"
LAYOUTS = {"baichuan2_7b": "baichuan2-7b", "baichuan2_13b": "baichuan2-13b"}
TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    # The fixtures are read-only: conversions go to a per-test cache.
    monkeypatch.setenv("FAMTUNE_CACHE", str(tmp_path / "cache"))


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def reference(layout: str):
    return read_json(REFERENCE / layout / "reference.json")


def reference_logits(layout: str):
    return load_file(REFERENCE / layout / "reference_logits.safetensors")


def load(path: Path, **kwargs):
    ckpt = open_checkpoint(str(path))
    return ckpt, ckpt.load_model(**kwargs)


def max_logit_diff(model, layout: str) -> float:
    logits = reference_logits(layout)
    worst = 0.0
    for seq in reference(layout)["sequences"]:
        with torch.no_grad():
            out = model(torch.tensor([seq["input_ids"]]))
        worst = max(worst, (out.logits[0] - logits[f"seq{seq['index']}.logits"]).abs().max().item())
    return worst


@functools.cache
def tokenizer_of(layout: str):
    """The family and the real tokenizer (loaded once per layout: tests only read it)."""
    ckpt = open_checkpoint(str(REFERENCE / layout / "tiny"))
    return ckpt.family, ckpt.family.load_tokenizer(str(REFERENCE / layout / "tokenizer"), False)


# -- claims ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_original_checkpoint_is_claimed_as_its_variant(layout):
    assert open_checkpoint(str(REFERENCE / layout / "tiny")).family.name == LAYOUTS[layout]


def test_baichuan1_and_plain_llama_are_not_claimed():
    from famtune.plugins import get_plugins

    def claimed(config):
        try:
            return get_plugins().claim(config, "x").name
        except FamtuneError:  # no family claims it
            return None

    config = read_json(REFERENCE / "baichuan2_13b" / "tiny" / "config.json")
    assert claimed(config) == "baichuan2-13b"
    assert claimed({**config, "vocab_size": 64000}) is None  # Baichuan (v1)
    assert claimed({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}) is None
    assert claimed({"model_type": "llama", "famtune_family": "qwen2"}) == "qwen2"  # the marker names another family


# -- model parity -----------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_logits_and_cached_greedy_match_the_original(layout, record_property):
    _, model = load(REFERENCE / layout / "tiny")
    assert type(model).__name__ == ("LlamaForCausalLM" if layout == "baichuan2_7b" else "BaichuanAlibiForCausalLM")
    assert type(model.lm_head) is torch.nn.Linear
    diff = max_logit_diff(model, layout)
    record_property("max_abs_logit_diff", diff)
    print(f"{layout}: max abs logit diff {diff:.3g}")
    assert diff <= TOLERANCE
    for seq in reference(layout)["sequences"]:
        ids = torch.tensor([seq["input_ids"]])
        out = model.generate(
            ids, max_new_tokens=5, do_sample=False, repetition_penalty=1.0, eos_token_id=None, use_cache=True
        )
        assert out[0, ids.shape[1] :].tolist() == seq["greedy_next_5"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_padding_masks_keys_and_keeps_each_sequence_exact(layout):
    _, model = load(REFERENCE / layout / "tiny")
    seqs = reference(layout)["sequences"][:2]
    logits = reference_logits(layout)
    short, long_ = seqs[0]["input_ids"], seqs[1]["input_ids"]
    pad = [0] * (len(long_) - len(short))
    mask = torch.tensor([[1] * len(short) + [0] * len(pad), [1] * len(long_)])
    with torch.no_grad():
        out = model(torch.tensor([short + pad, long_]), attention_mask=mask).logits
    assert (out[0, : len(short)] - logits["seq0.logits"]).abs().max() <= TOLERANCE
    assert (out[1] - logits["seq1.logits"]).abs().max() <= TOLERANCE
    assert torch.isfinite(out).all()
    # Batched generation pads on the left; the cache then carries the padding mask along.
    left_mask = torch.tensor([[0] * len(pad) + [1] * len(short), [1] * len(long_)])
    gen = model.generate(
        torch.tensor([pad + short, long_]),
        attention_mask=left_mask,
        max_new_tokens=5,
        do_sample=False,
        repetition_penalty=1.0,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert gen[0, len(long_) :].tolist() == seqs[0]["greedy_next_5"]
    assert gen[1, len(long_) :].tolist() == seqs[1]["greedy_next_5"]


def test_alibi_model_refuses_packed_rows():
    _, model = load(REFERENCE / "baichuan2_13b" / "tiny")
    ids = torch.tensor([reference("baichuan2_13b")["sequences"][0]["input_ids"]])
    with pytest.raises(ValueError, match="packed sequences"):
        model(ids, position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]]))


def test_alibi_slopes_follow_the_published_series():
    from famtune_baichuan2.modeling_alibi import alibi_slopes

    # 8 heads: 1/2 ... 1/256 (ALiBi paper). 12 heads: the 8-head series, then every other slope of
    # the 16-head series 2^-0.5, 2^-1, ..., i.e. 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5.
    assert alibi_slopes(8) == pytest.approx([2.0**-k for k in range(1, 9)])
    assert alibi_slopes(12) == pytest.approx([2.0**-k for k in (*range(1, 9), 0.5, 1.5, 2.5, 3.5)])
    assert alibi_slopes(40)[:32] == pytest.approx([2.0 ** (-k / 4) for k in range(1, 33)])
    assert alibi_slopes(40)[32:] == pytest.approx([2.0 ** (-k / 8) for k in range(1, 16, 2)])


def test_remote_code_in_the_checkpoint_is_never_run(tmp_path):
    copy = tmp_path / "baichuan2-13b-copy"
    shutil.copytree(REFERENCE / "baichuan2_13b" / "tiny", copy)
    for name in ("modeling_baichuan.py", "configuration_baichuan.py"):
        (copy / name).write_text("raise RuntimeError('remote code was imported')\n")
    _, model = load(copy)
    assert max_logit_diff(model, "baichuan2_13b") <= TOLERANCE
    assert not (copy / "__pycache__").exists()


def test_alibi_model_saves_and_reloads_as_a_claimed_native_checkpoint(tmp_path):
    _, model = load(REFERENCE / "baichuan2_13b" / "tiny")
    model.save_pretrained(tmp_path / "native")
    ckpt, reloaded = load(tmp_path / "native")
    assert ckpt.family.name == "baichuan2-13b"
    assert type(reloaded).__name__ == "BaichuanAlibiForCausalLM"
    assert max_logit_diff(reloaded, "baichuan2_13b") <= TOLERANCE


# -- NF4 (QLoRA base) -----------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_nf4_load_quantizes_the_decoder_and_gives_a_finite_loss(layout):
    import bitsandbytes as bnb

    ckpt, model = load(REFERENCE / layout / "tiny", quantization="nf4")
    quantized = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized == set(ckpt.family.lora_target_modules(model, "all-linear"))
    assert quantized == set(ckpt.family.lora_target_modules(model, "default"))
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    ids = torch.tensor([reference(layout)["sequences"][1]["input_ids"]])
    # With grad enabled, as in training: bitsandbytes' CPU inference path (no grad, eval) repacks
    # weights in blocks that the tiny 172-wide MLP does not divide into.
    loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss)


def test_nf4_alibi_backward_with_gradient_checkpointing_and_lora():
    from peft import LoraConfig, get_peft_model

    ckpt, model = load(REFERENCE / "baichuan2_13b" / "tiny", quantization="nf4")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as train.py
    model.enable_input_require_grads()
    model = get_peft_model(
        model,
        LoraConfig(
            r=4, lora_alpha=8, task_type="CAUSAL_LM", target_modules=ckpt.family.lora_target_modules(model, "default")
        ),
    )
    model.train()
    calls = []
    # The layer's first sub-module: the checkpoint replays the layer's forward (not the layer's own
    # hooks) and, non-reentrant, stops replaying once it has what backward needs.
    model.base_model.model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *args: calls.append(1))
    ids = torch.tensor([reference("baichuan2_13b")["sequences"][2]["input_ids"]])
    labels = ids.clone()
    labels[0, :10] = IGNORE_INDEX
    loss = model(ids, attention_mask=torch.ones_like(ids), labels=labels).loss
    loss.backward()
    assert len(calls) == 2  # the layer ran again during backward: it was checkpointed
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


# -- layout round trip ------------------------------------------------------------------------------
def assert_same_tensors(left: dict, right: dict):
    assert sorted(left) == sorted(right)
    for name in left:
        assert left[name].dtype == right[name].dtype and torch.equal(left[name], right[name]), name


@pytest.mark.parametrize("layout", LAYOUTS)
def test_original_native_original_round_trip_is_bit_exact(layout, tmp_path):
    from famtune_baichuan2 import convert

    source = REFERENCE / layout / "tiny"
    config = read_json(source / "config.json")
    native = convert.native_dir(str(source), config)
    assert Path(native).is_relative_to(tmp_path)
    ckpt = open_checkpoint(str(native))
    assert ckpt.family.name == LAYOUTS[layout]
    assert ckpt.family.write_original_layout(native, str(tmp_path / "original"), config)
    assert read_json(tmp_path / "original" / "config.json") == config
    assert_same_tensors(load_file(tmp_path / "original" / "model.safetensors"), load_file(source / "model.safetensors"))
    # The native head is the normalised NormHead: same as the original's first forward does.
    native_head = load_file(Path(native) / "model.safetensors")[convert.HEAD]
    raw = load_file(source / "model.safetensors")[convert.HEAD]
    assert torch.equal(native_head, torch.nn.functional.normalize(raw, dim=-1))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_merged_model_writes_the_original_layout(layout, tmp_path):
    source = REFERENCE / layout / "tiny"
    config = read_json(source / "config.json")
    original = load_file(source / "model.safetensors")
    ckpt, model = load(source)
    model.save_pretrained(tmp_path / "merged")  # what a merge writes: the native layout only
    assert ckpt.family.write_original_layout(str(tmp_path / "merged"), str(tmp_path / "exact"), config)
    # The converted copy in the cache still holds the raw head, and the merged head is unchanged.
    assert_same_tensors(load_file(tmp_path / "exact" / "model.safetensors"), original)
    # Without that copy (cache cleared) the normalised rows are written: a NormHead checkpoint too.
    shutil.rmtree(tmp_path / "cache")
    assert ckpt.family.write_original_layout(str(tmp_path / "merged"), str(tmp_path / "normalised"), config)
    written = load_file(tmp_path / "normalised" / "model.safetensors")
    head, raw = written.pop("lm_head.weight"), original.pop("lm_head.weight")
    assert_same_tensors(written, original)
    assert torch.equal(head, torch.nn.functional.normalize(raw, dim=-1))
    again, reloaded = load(tmp_path / "normalised")
    assert again.family.name == LAYOUTS[layout]
    assert max_logit_diff(reloaded, layout) <= TOLERANCE


def write_shards(directory: Path, tensors: dict, shards: list[list[str]]) -> None:
    from safetensors.torch import save_file

    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def read_shards(directory: Path) -> dict:
    index = directory / "model.safetensors.index.json"
    files = set(read_json(index)["weight_map"].values()) if index.exists() else {"model.safetensors"}
    return {k: v for f in files for k, v in load_file(directory / f).items()}


def test_sharded_checkpoints_convert_both_ways(tmp_path):
    from famtune_baichuan2 import convert

    source = REFERENCE / "baichuan2_13b" / "tiny"
    config = read_json(source / "config.json")
    original = load_file(source / "model.safetensors")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(source / "config.json", sharded)
    names = sorted(original)
    write_shards(sharded, original, [names[:8], names[8:]])
    _, model = load(sharded)
    assert max_logit_diff(model, "baichuan2_13b") <= TOLERANCE
    # A native layout saved with each layer's q_proj in another shard than its k_proj/v_proj.
    native = Path(convert.native_dir(str(sharded), config))
    split = tmp_path / "split"
    shutil.copytree(native, split, ignore=shutil.ignore_patterns("model*.safetensors*"))
    tensors = read_shards(native)
    first = sorted(n for n in tensors if "q_proj" in n)
    write_shards(split, tensors, [first, sorted(set(tensors) - set(first))])
    assert convert.write_original_layout(str(split), str(tmp_path / "back"), config)
    assert_same_tensors(read_shards(tmp_path / "back"), original)


def test_pickled_weights_are_refused_with_a_hint(tmp_path):
    shutil.copy(REFERENCE / "baichuan2_7b" / "tiny" / "config.json", tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FamtuneError, match="pytorch_model.bin.*safetensors only"):
        load(tmp_path)


# -- tokenizer and chat format ----------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_tokenizer_reproduces_the_original_ids_and_decodes(layout):
    _, tok = tokenizer_of(layout)
    facts = read_json(REFERENCE / layout / "chat_ids.json")
    assert len(tok) == facts["tokenizer_vocab_size"]
    for name, case in facts["plain_strings"].items():
        assert tok(case["text"])["input_ids"] == case["input_ids"], name
        assert tok(case["text"], add_special_tokens=False)["input_ids"] == case["input_ids_no_special"], name
        assert tok.encode(case["text"]) == case["encode"], name
        assert tok.decode(case["input_ids"]) == case["decoded"], name
        assert tok.decode(case["input_ids"], skip_special_tokens=True) == case["decoded_skip_special"], name


@pytest.mark.parametrize("layout", LAYOUTS)
def test_conversations_match_build_chat_input_id_for_id(layout):
    family, tok = tokenizer_of(layout)
    facts = read_json(REFERENCE / layout / "chat_ids.json")
    template = family.chat_template()
    for name, conv in facts["conversations"].items():
        expected = conv["build_chat_input"]["input_ids"]
        enc = family.encode(tok, conv["messages"], "all_assistant", add_generation_prompt=True)
        assert enc.input_ids == expected, name
        rendered = tok.apply_chat_template(
            conv["messages"], chat_template=template, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert rendered == expected, name
        assert tok.decode(expected) == conv["build_chat_input"]["decoded"], name


def training_conversation(facts):
    """c3 (system, user, assistant, user) answered again with c3's first reply, and its golden parts."""
    c3 = facts["conversations"]["c3_multi_turn"]
    ids = c3["build_chat_input"]["input_ids"]
    user, assistant = facts["user_token_id"], facts["assistant_token_id"]
    first_reply = ids[ids.index(assistant) + 1 : ids.index(user, ids.index(assistant))]
    messages = c3["messages"] + [{"role": "assistant", "content": c3["messages"][2]["content"]}]
    return messages, ids, first_reply


@pytest.mark.parametrize("layout", LAYOUTS)
def test_golden_labels_for_every_masking_policy(layout):
    family, tok = tokenizer_of(layout)
    facts = read_json(REFERENCE / layout / "chat_ids.json")
    messages, prompt, reply = training_conversation(facts)
    eos, user = 2, facts["user_token_id"]
    start = prompt.index(facts["assistant_token_id"]) + 1  # first reply begins here
    second_user = start + len(reply)
    ids = prompt + reply + [eos]
    ignore = IGNORE_INDEX
    golden = {
        "all_assistant": [ignore] * start + reply + [user] + [ignore] * (len(prompt) - second_user - 1) + reply + [eos],
        "last_turn": [ignore] * len(prompt) + reply + [eos],
        "train_on_prompt": ids,
        "efficient_eos": [ignore] * start + reply + [eos] + [ignore] * (len(prompt) - second_user - 1) + reply + [eos],
    }
    assert family.masking_policies() == list(golden)
    template = family.chat_template()
    rendered = tok.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=False)
    assert rendered == ids
    for policy, labels in golden.items():
        enc = family.encode(tok, messages, policy)
        assert enc.input_ids == ids, policy
        assert enc.labels == labels, policy
    with pytest.raises(FamtuneError, match="unknown masking policy 'bogus'"):
        family.encode(tok, messages, "bogus")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_text_spelling_control_tokens_is_tokenized_as_the_original_does(layout):
    # <reserved_106>/<reserved_107> are user-defined pieces of the SentencePiece model, so the
    # original tokenizer turns that text into 195/196 (chat_ids.json's decodes show exactly this text
    # for those ids); its slow tokenizer also split on </s>. famtune keeps both behaviours.
    family, tok = tokenizer_of(layout)
    facts = read_json(REFERENCE / layout / "chat_ids.json")
    for conv in facts["conversations"].values():
        assert tok.encode(conv["build_chat_input"]["decoded"]) == conv["build_chat_input"]["input_ids"]
    user, assistant, eos = facts["user_token_id"], facts["assistant_token_id"], 2
    enc = family.encode(tok, [{"role": "user", "content": "a<reserved_107>b</s>"}], "all_assistant", True)
    assert enc.input_ids == [user, *tok.encode("a"), assistant, *tok.encode("b"), eos, assistant]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_generation_defaults_come_from_the_chat_generation_config(layout):
    family, tok = tokenizer_of(layout)
    gen_config = read_json(REFERENCE / layout / "tiny" / "generation_config.json")
    facts = read_json(REFERENCE / layout / "chat_ids.json")
    defaults = family.generation_defaults(tok)
    assert defaults.stop_ids == [gen_config["eos_token_id"], gen_config["user_token_id"]]
    for key in ("temperature", "top_p", "top_k", "repetition_penalty", "do_sample"):
        assert defaults.sampling[key] == gen_config[key]
    conv = family.conversation_template().copy()
    conv.append_message(conv.roles[0], "hi")
    conv.append_message(conv.roles[1], None)
    assert tok.encode(conv.get_prompt()) == [facts["user_token_id"]] + tok.encode("hi") + [facts["assistant_token_id"]]


def test_missing_tokenizer_model_is_a_one_line_error():
    family, _ = tokenizer_of("baichuan2_13b")
    with pytest.raises(FamtuneError, match="no tokenizer.model") as err:
        family.load_tokenizer(str(REFERENCE / "baichuan2_13b" / "tiny"), False)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("family", LAYOUTS.values())
def test_tiny_checkpoint_is_an_original_layout_that_trains(family, tmp_path):
    from famtune.demo import demo_corpus
    from famtune.plugins import get_plugins

    assert get_plugins().claim({}, "", family=family).tiny_checkpoint(str(tmp_path / "tiny"), demo_corpus())
    config = read_json(tmp_path / "tiny" / "config.json")
    assert config["model_type"] == "baichuan" and "auto_map" in config
    assert any(n.endswith("W_pack.weight") for n in load_file(tmp_path / "tiny" / "model.safetensors"))
    ckpt, model = load(tmp_path / "tiny", quantization="nf4")
    assert ckpt.family.name == family
    tok = ckpt.load_tokenizer()
    messages = [{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是FamBot。"}]
    enc = ckpt.family.encode(tok, messages, "all_assistant")
    assert enc.input_ids[0] == tok.convert_tokens_to_ids("<reserved_106>") and enc.input_ids[-1] == 2
    assert torch.isfinite(model(torch.tensor([enc.input_ids]), labels=torch.tensor([enc.labels])).loss)
