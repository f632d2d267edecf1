"""Qwen-7B-Chat (Qwen1): native loading, tokenizer, chat format and labels against the reference fixtures.

Ground truth comes from ../shared/fixtures/reference/qwen1, produced by Qwen1's own remote code
(modeling_qwen.py, tokenization_qwen.py, make_context); see its README. Nothing here runs that code.
"""

from __future__ import annotations

import base64
import json
import math
import random
import shutil
import unicodedata
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from famtune import convert as toolkit
from famtune.checkpoint import model_load_kwargs, open_checkpoint
from famtune.encoding import IGNORE_INDEX
from famtune.errors import FamtuneError
from famtune_qwen import convert as qwen1_convert
from famtune_qwen import template
from famtune_qwen import tokenizer as qwen1_tokenizer
from famtune_qwen.family import TARGETS, Qwen1

REF = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "reference" / "qwen1"
TINY = REF / "tiny"
CHAT = json.loads((REF / "chat_ids.json").read_text(encoding="utf-8"))
REFERENCE = json.loads((REF / "reference.json").read_text(encoding="utf-8"))
ORIGINAL_CONFIG = json.loads((TINY / "config.json").read_text(encoding="utf-8"))

# Ids as Qwen1's own make_context emits them (chat_ids.json).
IM_START, IM_END, NL = 151644, 151645, 198
ROLE_IDS = {8948: "system", 872: "user", 77091: "assistant"}
X = IGNORE_INDEX
# Qwen1's pre-tokenizer regex (tokenization_qwen.py PAT_STR), for the tiktoken cross-check.
QWEN1_PAT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    # One cache per module, so the tokenizer's vocabulary is converted once for all tests here.
    path = tmp_path_factory.mktemp("famtune-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FAMTUNE_CACHE", str(path))
        yield path


@pytest.fixture(autouse=True)
def _cache_env(cache_dir, monkeypatch):
    monkeypatch.setenv("FAMTUNE_CACHE", str(cache_dir))


@pytest.fixture(scope="module")
def tokenizer(cache_dir):
    return qwen1_tokenizer.load_tokenizer(str(REF / "tokenizer"))


@pytest.fixture(scope="module")
def model(cache_dir):
    m = qwen1_convert.load_model(str(TINY), model_load_kwargs("none", "fp32", torch.device("cpu")))
    return m.eval()


def make_checkpoint(dest: Path, remote_code_raises: bool = True) -> Path:
    """A Qwen1 checkpoint directory as published: tiny weights, the real tokenizer files and
    remote-code modules that fail loudly if anything imports them."""
    dest.mkdir(parents=True)
    for src in list(TINY.iterdir()) + list((REF / "tokenizer").iterdir()):
        shutil.copyfile(src, dest / src.name)
    if remote_code_raises:
        for name in ("modeling_qwen.py", "configuration_qwen.py", "tokenization_qwen.py", "qwen_generation_utils.py"):
            (dest / name).write_text(f"raise RuntimeError('remote code {name} must never be imported')\n")
    return dest


def logits_of(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    return out.logits[0], out.hidden_states[-1][0]


# -- conversion --------------------------------------------------------------------------------------


def test_claims_original_config_and_not_native_or_plain_qwen2():
    assert qwen1_convert.is_original(ORIGINAL_CONFIG)
    native = qwen1_convert.native_config(ORIGINAL_CONFIG)
    assert not qwen1_convert.is_original(native)
    assert native["famtune_family"] == "qwen1" and native["model_type"] == "qwen2"
    assert not qwen1_convert.is_original({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]})


def test_native_config_follows_the_measured_mapping():
    native = qwen1_convert.native_config(ORIGINAL_CONFIG)
    assert native["intermediate_size"] == 172  # 344 counts w1 and w2
    assert native["num_key_value_heads"] == native["num_attention_heads"] == 4
    assert native["hidden_size"] // native["num_attention_heads"] == ORIGINAL_CONFIG["kv_channels"]
    assert native["rms_norm_eps"] == 1e-6
    assert native["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert native["max_position_embeddings"] == ORIGINAL_CONFIG["seq_length"] == 8192
    assert native["tie_word_embeddings"] is False


def test_rejects_configs_the_mapping_does_not_cover():
    with pytest.raises(FamtuneError, match=r"rotary_pct=0\.5"):
        qwen1_convert.native_config({**ORIGINAL_CONFIG, "rotary_pct": 0.5})
    with pytest.raises(FamtuneError, match="kv_channels=8"):
        qwen1_convert.native_config({**ORIGINAL_CONFIG, "kv_channels": 8})


def test_reference_logits_and_greedy_continuations(model, record_property):
    assert type(model).__name__ == "Qwen2ForCausalLM"
    ref = load_file(str(REF / "reference_logits.safetensors"))
    worst = 0.0
    for seq in REFERENCE["sequences"]:
        i, ids = seq["index"], seq["input_ids"]
        logits, hidden = logits_of(model, ids)
        diff = (logits - ref[f"seq{i}.logits"]).abs().max().item()
        worst = max(worst, diff)
        assert diff <= 1e-4, f"seq{i}: max abs logit diff {diff}"
        assert (hidden - ref[f"seq{i}.last_hidden_state"]).abs().max().item() <= 1e-4
        # The reference ran generate() with repetition_penalty 1.0; the chat generation_config has 1.1.
        out = model.generate(
            torch.tensor([ids]),
            do_sample=False,
            max_new_tokens=5,
            eos_token_id=None,
            pad_token_id=0,
            repetition_penalty=1.0,
        )
        assert out[0, len(ids) :].tolist() == seq["greedy_next_5"]
        seqn = list(ids)
        for _ in range(5):  # no-cache loop: the whole sequence recomputed at every step
            seqn.append(int(logits_of(model, seqn)[0][-1].argmax()))
        assert seqn[len(ids) :] == seq["greedy_next_5_nocache"]
    record_property("qwen1_max_abs_logit_diff", worst)
    print(f"qwen1 max abs logit diff vs reference: {worst:.3g}")


def test_in_memory_round_trip_is_bit_exact():
    sd = load_file(str(TINY / "model.safetensors"))
    native_cfg, native_sd = qwen1_convert.to_native(ORIGINAL_CONFIG, sd)
    assert native_sd["model.layers.0.mlp.gate_proj.weight"].equal(sd["transformer.h.0.mlp.w2.weight"])
    assert native_sd["model.layers.0.mlp.up_proj.weight"].equal(sd["transformer.h.0.mlp.w1.weight"])
    assert native_sd["model.layers.1.self_attn.k_proj.bias"].equal(sd["transformer.h.1.attn.c_attn.bias"][64:128])
    cfg, back = qwen1_convert.to_original(native_cfg, native_sd, ORIGINAL_CONFIG)
    assert cfg == ORIGINAL_CONFIG
    assert set(back) == set(sd)
    assert all(back[k].equal(sd[k]) for k in sd)


def test_saved_native_model_writes_back_the_original_layout_bit_exact(model, tmp_path):
    native_dir, out_dir = tmp_path / "native", tmp_path / "original"
    model.save_pretrained(native_dir)
    saved = json.loads((native_dir / "config.json").read_text())
    assert saved["famtune_family"] == "qwen1"  # a merged model stays claimed as Qwen1
    assert qwen1_convert.write_original_layout(str(native_dir), str(out_dir), ORIGINAL_CONFIG) is True
    assert json.loads((out_dir / "config.json").read_text()) == ORIGINAL_CONFIG
    orig, back = load_file(str(TINY / "model.safetensors")), load_file(str(out_dir / "model.safetensors"))
    assert set(back) == set(orig)
    assert all(back[k].equal(orig[k]) for k in orig)


def test_sharded_original_layout_loads_with_the_same_logits(model, tmp_path):
    native_dir, out_dir = tmp_path / "native", tmp_path / "sharded"
    model.save_pretrained(native_dir)
    qwen1_convert.write_original_layout(str(native_dir), str(out_dir), ORIGINAL_CONFIG, max_shard_bytes=300_000)
    index = json.loads((out_dir / toolkit.INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = qwen1_convert.load_model(str(out_dir), model_load_kwargs("none", "fp32", torch.device("cpu")))
    ids = REFERENCE["sequences"][1]["input_ids"]
    assert logits_of(reloaded, ids)[0].equal(logits_of(model, ids)[0])


def test_incomplete_or_foreign_weights_are_refused():
    sd = load_file(str(TINY / "model.safetensors"))
    del sd["transformer.h.1.mlp.w2.weight"]
    with pytest.raises(FamtuneError, match=r"transformer\.h\.1\.mlp\.w2\.weight"):
        qwen1_convert.to_native(ORIGINAL_CONFIG, sd)
    sd = load_file(str(TINY / "model.safetensors"))
    sd["transformer.h.0.attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(FamtuneError, match="unexpected tensor"):
        qwen1_convert.to_native(ORIGINAL_CONFIG, sd)


def test_load_converts_into_the_cache_and_leaves_the_source_alone(tmp_path, cache_dir):
    src = make_checkpoint(tmp_path / "ckpt")
    before = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
    first = qwen1_convert.native_dir_for(src)
    assert first.parent == cache_dir / "native" / "qwen1"  # famtune.convert's one cache scheme
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert qwen1_convert.native_dir_for(src) == first  # reused, not rebuilt
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    assert {p.name: p.stat().st_mtime_ns for p in src.iterdir()} == before
    assert not list(first.glob("*.py"))  # no remote code is carried into the native directory


# -- through the plugin: claim, tokenizer, model ----------------------------------------------------


def test_checkpoint_whose_remote_code_raises_still_loads_natively(tmp_path):
    ckpt = open_checkpoint(str(make_checkpoint(tmp_path / "ckpt")))
    assert ckpt.family.name == "qwen1"
    tok = ckpt.load_tokenizer()
    assert tok("Hello! What can you do?")["input_ids"] == [9707, 0, 3555, 646, 498, 653, 30]
    model = ckpt.load_model(quantization="none", compute_dtype="fp32")
    assert type(model).__name__ == "Qwen2ForCausalLM"
    seq = REFERENCE["sequences"][0]
    ref = load_file(str(REF / "reference_logits.safetensors"))["seq0.logits"]
    assert (logits_of(model, seq["input_ids"])[0] - ref).abs().max().item() <= 1e-4


def test_converted_native_directory_is_still_claimed_as_qwen1(tmp_path):
    native = qwen1_convert.native_dir_for(make_checkpoint(tmp_path / "ckpt", remote_code_raises=False))
    ckpt = open_checkpoint(str(native))
    assert ckpt.family.name == "qwen1"
    model = ckpt.load_model(quantization="none", compute_dtype="fp32")  # plain native load, no conversion
    assert type(model).__name__ == "Qwen2ForCausalLM"


def test_nf4_load_gives_linear4bit_and_a_finite_loss(tmp_path):
    import bitsandbytes as bnb

    ckpt = open_checkpoint(str(make_checkpoint(tmp_path / "ckpt")))
    model = ckpt.load_model(quantization="nf4", compute_dtype="fp32")
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    assert ckpt.family.lora_target_modules(model, "default") == list(TARGETS)
    ids = torch.tensor([REFERENCE["sequences"][2]["input_ids"]])
    loss = model(ids, labels=ids).loss
    assert math.isfinite(loss.item())


# -- tokenizer -------------------------------------------------------------------------------------------


def test_tokenizer_reproduces_the_plain_strings(tokenizer):
    assert len(tokenizer) == CHAT["tokenizer_vocab_size"] == 151851
    assert tokenizer.convert_tokens_to_ids(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|extra_0|>", "<|extra_204|>"]
    ) == [151643, 151644, 151645, 151646, 151850]
    for name, case in CHAT["plain_strings"].items():
        assert tokenizer(case["text"])["input_ids"] == case["input_ids"], name
        assert tokenizer.encode(case["text"]) == case["encode"], name
        assert tokenizer.decode(case["input_ids"]) == case["decoded"], name


def test_tokenizer_reproduces_make_context_raw_text(tokenizer):
    for name, conv in CHAT["conversations"].items():
        for variant in ("make_context", "make_context_empty_system"):
            if variant in conv:
                ref = conv[variant]
                assert tokenizer(ref["raw_text"])["input_ids"] == ref["input_ids"], (name, variant)
                assert tokenizer.decode(ref["input_ids"]) == ref["decoded"], (name, variant)


def test_tokenizer_agrees_with_tiktoken_on_a_corpus(tokenizer):
    """tiktoken with the same ranks and regex is the engine QWenTokenizer wraps (after NFC)."""
    import tiktoken

    ranks = {}
    for line in (REF / "tokenizer" / "qwen.tiktoken").read_bytes().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    enc = tiktoken.Encoding("qwen1", pat_str=QWEN1_PAT, mergeable_ranks=ranks, special_tokens={})
    rng = random.Random(7)
    alphabet = " \n\t\r  abcXYZ019你好😊🙏\u200d\ufe0f🏽!?.,;:'\"-_=+*/\\()[]{}<>|éñßü\u0301" + "ﾟ한국어"
    samples = [(Path(__file__).resolve().parents[2] / "shared" / "research" / "family-facts.md").read_text()]
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(500)]
    for text in samples:
        expected = enc.encode_ordinary(unicodedata.normalize("NFC", text))
        assert tokenizer(text, split_special_tokens=True)["input_ids"] == expected, repr(text[:80])


def test_control_token_text_policy(tokenizer):
    # tokenizer(text) parses control-token text as the original tokenizer(text) does
    # (allowed_special="all"); message text is encoded like make_context's allowed_special=set().
    assert tokenizer("a<|im_end|>b")["input_ids"] == [64, IM_END, 65]
    enc = template.QWEN1.encode(tokenizer, [{"role": "user", "content": "a<|im_end|>b"}], "all_assistant", True)
    content = enc.input_ids[
        14:-5
    ]  # after system block + "<|im_start|>user\n", before "<|im_end|>\n<|im_start|>assistant\n"
    assert IM_END not in content and tokenizer.decode(content) == "a<|im_end|>b"
    assert enc.input_ids.count(IM_END) == 2  # the system turn's and the user turn's own


# -- chat format ---------------------------------------------------------------------------------------


def test_encode_reproduces_make_context_id_for_id(tokenizer):
    for name, conv in CHAT["conversations"].items():
        enc = template.QWEN1.encode(tokenizer, conv["messages"], "all_assistant", add_generation_prompt=True)
        assert enc.input_ids == conv["make_context"]["input_ids"], name
        assert conv["make_context"]["system_used"] in (template.QWEN1_SYSTEM, conv["messages"][0]["content"])
        if "make_context_empty_system" in conv:
            messages = [{"role": "system", "content": ""}, *conv["messages"]]
            enc = template.QWEN1.encode(tokenizer, messages, "all_assistant", add_generation_prompt=True)
            assert enc.input_ids == conv["make_context_empty_system"]["input_ids"], name


def test_chat_template_gives_the_encode_ids(tokenizer):
    convs = [c["messages"] for c in CHAT["conversations"].values()]
    training = [c + [{"role": "assistant", "content": "Sure.\nTwo lines 😊"}] for c in convs]
    for messages, gen in [(m, True) for m in convs] + [(m, False) for m in training]:
        ids = tokenizer.apply_chat_template(
            messages, chat_template=template.QWEN1.jinja(), add_generation_prompt=gen, tokenize=True
        )["input_ids"]
        assert ids == template.QWEN1.encode(tokenizer, messages, "all_assistant", gen).input_ids


def test_fastchat_conversation_renders_make_context_text():
    conv = template.QWEN1.fastchat_conversation()
    ref = CHAT["conversations"]["c1_single_user"]
    conv.append_message(conv.roles[0], ref["messages"][0]["content"])
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == ref["make_context"]["raw_text"]
    assert conv.stop_token_ids == [151643, 151645]


def _blocks(ids: list[int]) -> list[tuple[str, int, int]]:
    """(role, index of <|im_start|>, index of <|im_end|>) for each turn, read from raw ids."""
    starts = [i for i, t in enumerate(ids) if t == IM_START]
    return [(ROLE_IDS[ids[s + 1]], s, ids.index(IM_END, s)) for s in starts]


def _expected_labels(ids: list[int], policy: str) -> list[int]:
    """Labels by the written rules (family facts §3.7 for qwen1_official), from ids alone."""
    keep = set()
    blocks = _blocks(ids)
    last_assistant = max(s for r, s, _ in blocks if r == "assistant")
    for role, s, e in blocks:
        content = set(range(s + 3, e + 1))  # the text and <|im_end|>, after <|im_start|> role \n
        if policy == "train_on_prompt":
            keep |= set(range(len(ids)))
        elif policy == "all_assistant" and role == "assistant":
            keep |= content
        elif policy == "last_turn" and s == last_assistant:
            keep |= content
        elif policy == "qwen1_official":
            keep |= {s, e, e + 1} | (content if role == "assistant" else set())
    return [t if i in keep else X for i, t in enumerate(ids)]


def test_golden_labels_for_every_policy(tokenizer):
    c3 = CHAT["conversations"]["c3_multi_turn"]
    messages = c3["messages"] + [{"role": "assistant", "content": "6."}]
    # make_context's ids, then "6." (digits are 15+d, "." is 13 in chat_ids.json) and <|im_end|>\n
    ids = c3["make_context"]["input_ids"] + [21, 13, IM_END, NL]
    assert template.QWEN1_POLICIES == ["all_assistant", "last_turn", "train_on_prompt", "qwen1_official"]
    for policy in template.QWEN1_POLICIES:
        enc = template.QWEN1.encode(tokenizer, messages, policy, add_generation_prompt=False)
        assert enc.input_ids == ids, policy
        assert enc.labels == _expected_labels(ids, policy), policy
    # Both assistant turns end in a supervised <|im_end|> under the default policy.
    enc = template.QWEN1.encode(tokenizer, messages, "all_assistant", add_generation_prompt=False)
    assert [lab for lab in enc.labels if lab == IM_END] == [IM_END, IM_END]


def test_official_labels_literally(tokenizer):
    messages = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4."}]
    enc = template.QWEN1.encode(tokenizer, messages, "qwen1_official", add_generation_prompt=False)
    system = [IM_START, 8948, NL, 2610, 525, 264, 10950, 17847, 13, IM_END, NL]
    user = [IM_START, 872, NL, 3838, 374, 220, 17, 488, 220, 17, 30, IM_END, NL]
    answer = [17, 488, 220, 17, 284, 220, 19, 13]
    assert enc.input_ids == system + user + [IM_START, 77091, NL] + answer + [IM_END, NL]
    assert enc.labels == (
        [IM_START]
        + [X] * 8
        + [IM_END, NL]
        + [IM_START]
        + [X] * 10
        + [IM_END, NL]
        + [IM_START, X, X]
        + answer
        + [IM_END, NL]
    )


def test_malformed_conversations_are_rejected_in_one_line(tokenizer):
    with pytest.raises(FamtuneError, match="message 2 has role 'user' where 'assistant' was expected"):
        template.QWEN1.encode(
            tokenizer, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "all_assistant", False
        )
    with pytest.raises(FamtuneError, match="only the first message"):
        template.QWEN1.encode(
            tokenizer, [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "all_assistant", False
        )
    with pytest.raises(ValueError, match="unknown masking policy 'everything'"):
        template.QWEN1.encode(tokenizer, [{"role": "user", "content": "a"}], "everything", True)


def test_generation_defaults_match_the_chat_generation_config(tokenizer):
    gen = Qwen1().generation_defaults(tokenizer)
    assert gen.stop_ids == [151643, 151645]
    cfg = json.loads((TINY / "generation_config.json").read_text())
    for key in ("do_sample", "top_p", "top_k", "repetition_penalty"):
        assert gen.sampling[key] == cfg[key], key
    assert gen.sampling["top_k"] == 0  # top-k filtering off, as in Qwen-7B-Chat


def test_family_hooks_answer_for_qwen1(tmp_path, tokenizer):
    family = open_checkpoint(str(make_checkpoint(tmp_path / "ckpt"))).family
    assert family.masking_policies()[-1] == "qwen1_official"
    assert family.chat_template() == template.QWEN1.jinja()
    assert family.conversation_template().name == "famtune-qwen1"
    assert family.generation_defaults(tokenizer).stop_ids == [151643, 151645]
    messages = CHAT["conversations"]["c2_system_user"]["messages"]
    enc = family.encode(tokenizer, messages, "all_assistant", add_generation_prompt=True)
    assert enc.input_ids == CHAT["conversations"]["c2_system_user"]["make_context"]["input_ids"]
