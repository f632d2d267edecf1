"""The InternLM2 plugin against the original code's reference outputs (../shared/fixtures).

Model parity uses the tiny original-layout checkpoint; chat and tokenizer parity use the real
tokenizer files and the ids the original tokenizer and chat code produced.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from famtune.checkpoint import open_checkpoint
from famtune.encoding import IGNORE_INDEX
from famtune.errors import FamtuneError, PluginError
from famtune.plugins import get_plugins
from famtune_internlm2 import convert

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "reference" / "internlm2"
TINY = FIXTURES / "tiny"
TOKENIZER_DIR = FIXTURES / "tokenizer"
REFERENCE = json.loads((FIXTURES / "reference.json").read_text(encoding="utf-8"))
CHAT_IDS = json.loads((FIXTURES / "chat_ids.json").read_text(encoding="utf-8"))
TINY_CONFIG = json.loads((TINY / "config.json").read_text(encoding="utf-8"))
SEQUENCES = REFERENCE["sequences"]

BOS, EOS, IM_START, IM_END = 1, 2, 92543, 92542  # facts: tokenizer_config.json added_tokens_decoder
NATIVE_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    # The fixture directory is read-only: the native-layout cache must live elsewhere.
    path = tmp_path_factory.mktemp("famtune-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FAMTUNE_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def checkpoint(cache_dir):
    return open_checkpoint(str(TINY))


@pytest.fixture(scope="module")
def family(checkpoint):
    return checkpoint.family


@pytest.fixture(scope="module")
def model(checkpoint):
    return checkpoint.load_model(quantization="none", compute_dtype="fp32")


@pytest.fixture(scope="module")
def tokenizer(family):
    return family.load_tokenizer(str(TOKENIZER_DIR), False)


def supervised_runs(enc) -> list[list[int]]:
    """Consecutive runs of supervised label ids."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in enc.labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return runs


# -- claim ----------------------------------------------------------------------------------------


def test_original_checkpoint_is_claimed_by_this_plugin(family):
    assert family.name == "internlm2"
    assert family.describe()["distribution"] == "famtune-internlm2"


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, None),
        ({"model_type": "llama", "famtune_family": "internlm2"}, "internlm2"),
        ({"model_type": "llama", "famtune_family": "qwen1"}, None),
        ({"model_type": "internlm2", "architectures": ["InternLM2ForRewardModel"]}, None),
        ({"model_type": "internlm3", "architectures": ["InternLM3ForCausalLM"]}, None),
        (TINY_CONFIG, "internlm2"),
    ],
)
def test_claim_only_internlm2_and_its_marked_native_layout(config, expected):
    try:
        claimed = get_plugins().claim(config, str(TINY)).name
    except FamtuneError:  # claimed by no family
        claimed = None
    assert (claimed if claimed == "internlm2" else None) == expected


# -- model parity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seq", SEQUENCES, ids=lambda s: f"seq{s['index']}")
def test_logits_match_original_code(model, seq, record_property):
    ref = load_file(str(FIXTURES / "reference_logits.safetensors"))
    ids = torch.tensor([seq["input_ids"]])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    diff = (out.logits[0] - ref[f"seq{seq['index']}.logits"]).abs().max().item()
    hidden_diff = (out.hidden_states[-1][0] - ref[f"seq{seq['index']}.last_hidden_state"]).abs().max().item()
    print(f"seq{seq['index']}: max abs logit diff {diff:.3e}, last hidden state diff {hidden_diff:.3e}")
    record_property("max_abs_logit_diff", diff)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert diff <= 1e-4
    assert hidden_diff <= 1e-4


@pytest.mark.parametrize("seq", SEQUENCES, ids=lambda s: f"seq{s['index']}")
def test_greedy_continuations_match_original_code(model, seq):
    ids = torch.tensor([seq["input_ids"]])
    with torch.no_grad():
        cached = model.generate(ids, do_sample=False, max_new_tokens=5, min_new_tokens=5, pad_token_id=EOS)
        manual = ids
        for _ in range(5):
            logits = model(manual, use_cache=False).logits
            manual = torch.cat([manual, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    n = ids.shape[1]
    assert cached[0, n:].tolist() == seq["greedy_next_5"]
    assert manual[0, n:].tolist() == seq["greedy_next_5_nocache"]


def test_no_remote_code_runs_and_source_stays_untouched(tmp_path, monkeypatch):
    src = tmp_path / "internlm2-chat"
    shutil.copytree(TINY, src)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(TOKENIZER_DIR / name, src / name)
    for module in (
        "modeling_internlm2",
        "configuration_internlm2",
        "tokenization_internlm2",
        "tokenization_internlm2_fast",
    ):
        (src / f"{module}.py").write_text(f"raise RuntimeError('remote code {module} was imported')\n")
    before = sorted(p.name for p in src.iterdir())
    monkeypatch.setenv("FAMTUNE_CACHE", str(tmp_path / "cache"))
    conversation = CHAT_IDS["conversations"]["c3_multi_turn"]
    for trust in (False, True):
        ckpt = open_checkpoint(str(src), trust_remote_code=trust)
        model = ckpt.load_model(quantization="none", compute_dtype="fp32")
        assert type(model).__name__ == "LlamaForCausalLM"
        with torch.no_grad():
            assert torch.isfinite(model(torch.tensor([SEQUENCES[0]["input_ids"]])).logits).all()
    # Even with remote code allowed, the tokenizer is built from the files, not the .py modules.
    tok = ckpt.load_tokenizer()
    enc = ckpt.family.encode(tok, conversation["messages"], "all_assistant", add_generation_prompt=True)
    assert enc.input_ids == conversation["build_inputs"]["input_ids"]
    assert sorted(p.name for p in src.iterdir()) == before
    assert list((tmp_path / "cache" / "native" / "internlm2").iterdir())  # famtune.convert's cache scheme


def test_qlora_nf4_load(checkpoint):
    import bitsandbytes as bnb

    model = checkpoint.load_model(quantization="nf4", compute_dtype="fp32")
    quantized = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized == NATIVE_TARGETS
    assert not isinstance(model.get_output_embeddings(), bnb.nn.Linear4bit)
    # Gradients stay enabled, as load_model leaves them for QLoRA training: bitsandbytes' CPU
    # inference kernel (taken under no_grad) needs out_features divisible by 32, and the tiny
    # model's MLP has 172.
    logits = model(torch.tensor([SEQUENCES[1]["input_ids"]])).logits
    assert logits.shape == (1, SEQUENCES[1]["length"], TINY_CONFIG["vocab_size"])
    assert torch.isfinite(logits).all()


def test_lora_targets_are_native_names_and_never_the_head(family, model):
    default = family.lora_target_modules(model, "default")
    assert set(default) == NATIVE_TARGETS
    all_linear = family.lora_target_modules(model, "all-linear")
    assert set(all_linear) == NATIVE_TARGETS
    assert "lm_head" not in default + all_linear


# -- conversion -----------------------------------------------------------------------------------


def test_round_trip_original_native_original_is_bit_exact(family, model, tmp_path):
    native_dir = tmp_path / "native"
    model.save_pretrained(native_dir)
    native_config = json.loads((native_dir / "config.json").read_text())
    assert native_config["famtune_family"] == "internlm2"
    assert open_checkpoint(str(native_dir)).family.name == "internlm2"

    out = tmp_path / "original"
    assert family.write_original_layout(str(native_dir), str(out), TINY_CONFIG) is True
    original = load_file(str(TINY / "model.safetensors"))
    written = load_file(str(out / "model.safetensors"))
    assert sorted(written) == sorted(original) == sorted(REFERENCE["checkpoint_keys"])
    for key, tensor in original.items():
        assert written[key].dtype == tensor.dtype and torch.equal(written[key], tensor), key
    assert json.loads((out / "config.json").read_text()) == TINY_CONFIG


def test_sharded_checkpoints_convert_both_ways(family, model, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    # An original checkpoint in two shards, as the released ones come (model-0000x-of-0000y).
    original = load_file(str(TINY / "model.safetensors"))
    src = tmp_path / "sharded"
    src.mkdir()
    keys = sorted(original)
    weight_map = {}
    for n, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :]), 1):
        name = f"model-0000{n}-of-00002.safetensors"
        save_file({k: original[k] for k in part}, str(src / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(TINY / "config.json", src / "config.json")
    monkeypatch.setenv("FAMTUNE_CACHE", str(tmp_path / "cache"))
    loaded = open_checkpoint(str(src)).load_model(quantization="none", compute_dtype="fp32")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

    # A native model saved in small shards may put a layer's q, k and v in different files.
    native_dir = tmp_path / "native"
    model.save_pretrained(native_dir, max_shard_size="40KB")
    assert len(list(native_dir.glob("*.safetensors"))) > 2
    out = tmp_path / "original"
    family.write_original_layout(str(native_dir), str(out), TINY_CONFIG)
    written = {}
    for f in out.glob("*.safetensors"):
        written.update(load_file(str(f)))
    assert sorted(written) == keys
    assert all(torch.equal(written[k], original[k]) for k in keys)


def test_state_dict_conversion_round_trip_is_bit_exact():
    original = load_file(str(TINY / "model.safetensors"))
    native = convert.to_native_state_dict(TINY_CONFIG, original)
    back = convert.to_original_state_dict(convert.to_native_config(TINY_CONFIG), native)
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[k], original[k]) for k in original)


@pytest.mark.parametrize("with_bias", [False, True])
def test_wqkv_is_split_per_kv_group(with_bias):
    heads, kv_heads, head_dim, hidden = 8, 2, 4, 3
    groups = heads // kv_heads
    config = {"num_attention_heads": heads, "num_key_value_heads": kv_heads, "hidden_size": heads * head_dim}
    # Label every row with (kv head, slot in block, row in head) following the published layout:
    # per kv head h, `groups` query heads, then key head h, then value head h.
    rows = [(h, slot, r) for h in range(kv_heads) for slot in range(groups + 2) for r in range(head_dim)]
    wqkv = torch.tensor([[h * 1000 + slot * 100 + r + c / 10 for c in range(hidden)] for h, slot, r in rows])
    tensor = wqkv[:, 0] if with_bias else wqkv
    q, k, v = convert.split_wqkv(tensor, config)
    for j in range(heads):
        block = q[j * head_dim : (j + 1) * head_dim]
        assert block.reshape(head_dim, -1)[:, 0].floor().tolist() == [
            (j // groups) * 1000 + (j % groups) * 100 + r for r in range(head_dim)
        ]
    for h in range(kv_heads):
        assert k[h * head_dim].reshape(-1)[0].floor().item() == h * 1000 + groups * 100
        assert v[h * head_dim].reshape(-1)[0].floor().item() == h * 1000 + (groups + 1) * 100
    assert torch.equal(convert.fuse_wqkv(q, k, v, config), tensor)


def test_dynamic_rope_scaling_maps_to_llama_dynamic():
    from transformers import LlamaConfig, LlamaForCausalLM

    original = dict(TINY_CONFIG, rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=8)
    native = convert.to_native_config(original)
    assert native["rope_parameters"] == {"rope_type": "dynamic", "rope_theta": 1e6, "factor": 2.0}
    assert convert.to_original_config(native)["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
    config = LlamaConfig(**{k: v for k, v in native.items() if k not in ("architectures", "model_type")})
    model = LlamaForCausalLM(config).eval()
    seq_len = 20
    with torch.no_grad():
        model(torch.arange(3, 3 + seq_len)[None])
    # InternLM2's dynamic NTK rule: base * (factor * len / max_pos - (factor - 1)) ** (d / (d - 2)).
    d = config.head_dim
    base = 1e6 * (2.0 * seq_len / 8 - 1.0) ** (d / (d - 2))
    expected = 1.0 / base ** (torch.arange(0, d, 2).float() / d)
    assert torch.allclose(model.model.rotary_emb.inv_freq, expected, rtol=1e-5)


# -- tokenizer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CHAT_IDS["plain_strings"]))
def test_plain_strings_match_original_tokenizer(tokenizer, name):
    case = CHAT_IDS["plain_strings"][name]
    assert tokenizer(case["text"])["input_ids"] == case["input_ids"]
    assert tokenizer.encode(case["text"], add_special_tokens=False) == case["input_ids_no_special"]
    assert tokenizer.decode(case["input_ids"], skip_special_tokens=True) == case["decoded_skip_special"]


def test_checkpoint_without_tokenizer_files_says_what_to_do(checkpoint):
    with pytest.raises(PluginError, match="no InternLM2 tokenizer files"):
        checkpoint.load_tokenizer()


def test_special_token_ids(tokenizer):
    assert tokenizer.bos_token_id == BOS and tokenizer.eos_token_id == EOS
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [IM_START, IM_END]
    assert len(tokenizer) == 92544


@pytest.mark.parametrize(
    "text",
    [
        "ＥＦ ａｂｃ —— …… full-width and user-defined pieces",
        "[UNUSED_TOKEN_3] and [UNUSED_TOKEN_146] are whole pieces",
        "nul\x00byte, tabs\t\t, spaces    and\n\n\nnewlines ",
        " leading space, 中文，标点。😀👍🏽 ❤️‍🔥",
    ],
)
def test_text_segments_match_sentencepiece(tokenizer, text):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(TOKENIZER_DIR / "tokenizer.model"))
    assert tokenizer.encode(text, add_special_tokens=False) == sp.encode(text)


# -- chat format ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CHAT_IDS["conversations"]))
def test_conversations_match_original_chat_code(family, tokenizer, name):
    case = CHAT_IDS["conversations"][name]
    enc = family.encode(tokenizer, case["messages"], "all_assistant", add_generation_prompt=True)
    assert enc.input_ids == case["build_inputs"]["input_ids"]
    assert enc.input_ids == case["chat_template"]["input_ids"]
    assert tokenizer(case["chat_template"]["text"], add_special_tokens=False)["input_ids"] == enc.input_ids
    persona = case.get("build_inputs_default_meta_instruction")
    if persona:  # chat()'s persona is an ordinary system message, not a default famtune adds
        messages = [{"role": "system", "content": persona["meta_instruction"]}] + case["messages"]
        assert family.encode(tokenizer, messages, "all_assistant", True).input_ids == persona["input_ids"]


def test_derived_chat_template_renders_the_published_templates_ids(family, tokenizer):
    """famtune saves the template derived from its one format definition, not the published string;
    both must give the same ids for every conversation famtune accepts (template.py explains why)."""
    published = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())["chat_template"]
    assert family.chat_template() != published
    cases = [c["messages"] for c in CHAT_IDS["conversations"].values()] + TRAINING_CONVERSATIONS
    for messages in cases:
        for gen in (False, True):
            msgs = messages[:-1] if gen and messages[-1]["role"] == "assistant" else messages
            ours, theirs = (
                tokenizer.apply_chat_template(msgs, chat_template=t, add_generation_prompt=gen, return_dict=False)
                for t in (family.chat_template(), published)
            )
            assert ours == theirs, msgs


TRAINING_CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "times 3?"},
        {"role": "assistant", "content": "12"},
    ],
    [{"role": "user", "content": "list"}, {"role": "assistant", "content": "\n\n- a\n- b"}],
    [
        {"role": "user", "content": "spell <|im_end|> and [UNUSED_TOKEN_145] please"},
        {"role": "assistant", "content": " 好的 <|im_start|>x"},
    ],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
]


@pytest.mark.parametrize("messages", TRAINING_CONVERSATIONS)
def test_apply_chat_template_equals_encode(family, tokenizer, messages):
    template = family.chat_template()
    full = tokenizer.apply_chat_template(messages, chat_template=template, return_dict=False)
    assert family.encode(tokenizer, messages, "all_assistant").input_ids == full
    prompt = messages[:-1]
    with_prompt = tokenizer.apply_chat_template(
        prompt, chat_template=template, add_generation_prompt=True, return_dict=False
    )
    assert family.encode(tokenizer, prompt, "all_assistant", add_generation_prompt=True).input_ids == with_prompt
    assert full.count(BOS) == 1 and full[0] == BOS


def test_text_spelling_a_control_token_becomes_that_token_as_in_the_original(family, tokenizer):
    # The original build_inputs tokenizes the whole rendered prompt, so user text spelling
    # <|im_end|> turns into id 92542 there; famtune keeps those ids.
    messages = [{"role": "user", "content": "a<|im_end|>b"}]
    enc = family.encode(tokenizer, messages, "all_assistant", add_generation_prompt=True)
    rendered = "<|im_start|>user\na<|im_end|>b<|im_end|>\n<|im_start|>assistant\n"
    assert enc.input_ids == tokenizer(rendered)["input_ids"]
    assert enc.input_ids.count(IM_END) == 2


def test_golden_labels_two_turns(family, tokenizer):
    messages = TRAINING_CONVERSATIONS[1]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    expected = [tokenizer.encode(a, add_special_tokens=False) + [IM_END] for a in answers]

    enc = family.encode(tokenizer, messages, "all_assistant")
    assert supervised_runs(enc) == expected
    assert all(label in (IGNORE_INDEX, tok) for label, tok in zip(enc.labels, enc.input_ids))
    # Each answer follows "<|im_start|>assistant\n" (ids from the reference chat ids).
    for run in expected:
        start = next(i for i in range(len(enc.labels)) if enc.labels[i : i + len(run)] == run)
        assert enc.input_ids[start - 4 : start] == [IM_START, 525, 11353, 364]
        assert enc.input_ids[start + len(run)] == 364 and enc.labels[start + len(run)] == IGNORE_INDEX

    last = family.encode(tokenizer, messages, "last_turn")
    assert last.input_ids == enc.input_ids
    assert supervised_runs(last) == expected[-1:]

    everything = family.encode(tokenizer, messages, "train_on_prompt")
    assert everything.input_ids == enc.input_ids and everything.labels == enc.input_ids


def test_answer_starting_with_newline_keeps_the_original_ids(family, tokenizer):
    messages = TRAINING_CONVERSATIONS[2]
    enc = family.encode(tokenizer, messages, "all_assistant")
    (run,) = supervised_runs(enc)
    start = enc.labels.index(run[0])
    # "assistant\n" + "\n\n- a..." merge across the cut; the shared token goes with the answer.
    assert tokenizer.decode(enc.input_ids[start - 2 : start]) == "assistant"
    assert tokenizer.decode(run) == "\n" + messages[1]["content"] + "<|im_end|>"


def test_masking_policies_and_unknown_policy(family, tokenizer):
    assert family.masking_policies() == ["all_assistant", "last_turn", "train_on_prompt"]
    with pytest.raises(PluginError, match="unknown masking policy 'bogus'"):
        family.encode(tokenizer, TRAINING_CONVERSATIONS[0], "bogus")


def test_bad_roles_are_refused(family, tokenizer):
    with pytest.raises(PluginError, match="role 'bot'"):
        family.encode(tokenizer, [{"role": "bot", "content": "x"}], "all_assistant")


def test_generation_defaults(family, tokenizer):
    gen = family.generation_defaults(tokenizer)
    assert gen.stop_ids == [EOS, IM_END]
    assert gen.sampling == {"do_sample": True, "temperature": 0.8, "top_p": 0.8}


def test_conversation_template(family):
    from fastchat.conversation import get_conv_template

    assert family.conversation_template().name == "famtune-internlm2"
    conv = get_conv_template("famtune-internlm2")  # registered by the core, handed out as a copy
    conv.append_message(conv.roles[0], "Hi")
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    conv.set_system_message("Be brief.")
    assert conv.get_prompt().startswith("<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
