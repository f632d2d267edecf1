"""famtune-chatglm: ChatGLM3 and GLM-4 loaded natively, tokenized and templated without remote code.

Ground truth comes from ../shared/fixtures/reference/chatglm3 (computed by the original remote
code) and, for GLM-4 (no fixture), from checkpoints and vocabularies built here in the original
layout plus an independent re-implementation of the original forward pass that is first checked
against the ChatGLM3 reference logits.
"""

from __future__ import annotations

import base64
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from famtune.checkpoint import open_checkpoint
from famtune.encoding import IGNORE_INDEX
from famtune.errors import FamtuneError
from famtune.plugins import get_plugins
from famtune_chatglm import convert as layout

REF = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "reference" / "chatglm3"
TINY = REF / "tiny"
TOKENIZER = REF / "tokenizer"
CHAT_IDS = json.loads((REF / "chat_ids.json").read_text(encoding="utf-8"))
REFERENCE = json.loads((REF / "reference.json").read_text(encoding="utf-8"))
ORIGINAL_CONFIG = json.loads((TINY / "config.json").read_text(encoding="utf-8"))

# The original GLM-4 tokenizer's split pattern and special-token order (ChatGLM4Tokenizer).
GLM4_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GLM4_SPECIALS = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
]
GLM4_RANKS = 151329  # size of the released GLM-4 vocabulary, so special ids land on the real ones


@pytest.fixture(autouse=True)
def famtune_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FAMTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def family(name: str):
    return get_plugins().claim({}, str(TINY), family=name)


@pytest.fixture(scope="module")
def glm3_tok():
    return family("chatglm3").load_tokenizer(str(TOKENIZER), trust_remote_code=False)


@pytest.fixture(scope="module")
def glm4_vocab(tmp_path_factory):
    """A tiktoken vocabulary in GLM-4's file format with as many ranks as the real one: all bytes,
    a few merges, and unreachable filler."""
    merges = [b"He", b"ll", b"llo", b"Hello", b" w", b"or", b"ld", b" wor", b" world", b"\n\n"]
    tokens = [bytes([i]) for i in range(256)] + merges
    tokens += [b"\xff\xfe" + i.to_bytes(3, "big") for i in range(GLM4_RANKS - len(tokens))]
    d = tmp_path_factory.mktemp("glm4_tokenizer")
    (d / "tokenizer.model").write_text(
        "".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)), encoding="utf-8"
    )
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ChatGLM4Tokenizer"}), encoding="utf-8")
    return d, {t: r for r, t in enumerate(tokens)}


@pytest.fixture(scope="module")
def glm4_tok(glm4_vocab):
    return family("glm4").load_tokenizer(str(glm4_vocab[0]), trust_remote_code=False)


@pytest.fixture(scope="module")
def glm4_reference(glm4_vocab):
    import tiktoken

    return tiktoken.Encoding(
        name="glm4-reference", pat_str=GLM4_PATTERN, mergeable_ranks=glm4_vocab[1], special_tokens={}
    )


def tensors_of(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# --- an independent forward pass of the original ChatGLM block ------------------------------------


def original_forward(sd: dict[str, torch.Tensor], cfg: dict, ids: list[int]) -> torch.Tensor:
    """Logits of the remote-code ChatGLM2/3/GLM-4 model, re-implemented from its definition:
    contiguous [Q;K;V], RoPE on the first half of each head in adjacent pairs with base
    10000 * rope_ratio, grouped kv heads, SwiGLU on [gate; up], RMSNorm."""
    sd = {k: v.float() for k, v in sd.items()}
    nh, d, g = cfg["num_attention_heads"], cfg["kv_channels"], cfg["multi_query_group_num"]
    eps, t = cfg["layernorm_epsilon"], len(ids)
    rot = d // 2
    base = 10000.0 * cfg.get("rope_ratio", 1)
    theta = 1.0 / (base ** (torch.arange(0, rot, 2, dtype=torch.float) / rot))
    angles = torch.outer(torch.arange(t, dtype=torch.float), theta)
    cos, sin = angles.cos(), angles.sin()

    def rope(x):  # [heads, t, d]
        pairs = x[..., :rot].reshape(*x.shape[:-1], rot // 2, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        turned = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
        return torch.cat([turned, x[..., rot:]], dim=-1)

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    h = sd["transformer.embedding.word_embeddings.weight"][torch.tensor(ids)]
    causal = torch.full((t, t), float("-inf")).triu(1)
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        x = rms(h, sd[p + "input_layernorm.weight"])
        qkv = x @ sd[p + "self_attention.query_key_value.weight"].T + sd[p + "self_attention.query_key_value.bias"]
        q, k, v = qkv.split([nh * d, g * d, g * d], dim=-1)
        q = rope(q.view(t, nh, d).transpose(0, 1))
        k = rope(k.view(t, g, d).transpose(0, 1)).repeat_interleave(nh // g, dim=0)
        v = v.view(t, g, d).transpose(0, 1).repeat_interleave(nh // g, dim=0)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + causal, dim=-1) @ v
        h = h + att.transpose(0, 1).reshape(t, nh * d) @ sd[p + "self_attention.dense.weight"].T
        x = rms(h, sd[p + "post_attention_layernorm.weight"])
        gate, up = (x @ sd[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, dim=-1)
        h = h + (torch.nn.functional.silu(gate) * up) @ sd[p + "mlp.dense_4h_to_h.weight"].T
    h = rms(h, sd["transformer.encoder.final_layernorm.weight"])
    return h @ sd["transformer.output_layer.weight"].T


def glm4_config(dtype: str) -> dict:
    """glm-4-9b-chat's config.json with the sizes shrunk."""
    auto = "modeling_chatglm.ChatGLMForConditionalGeneration"
    return {
        "_name_or_path": "THUDM/glm-4-9b-chat",
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": auto,
            "AutoModelForCausalLM": auto,
            "AutoModelForSeq2SeqLM": auto,
            "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
        },
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "attn_implementation": "sdpa",
        "bias_dropout_fusion": True,
        "ffn_hidden_size": 96,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": 64,
        "kv_channels": 16,
        "layernorm_epsilon": 1.5625e-07,
        "multi_query_attention": True,
        "multi_query_group_num": 2,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_layers": 2,
        "rope_ratio": 500,
        "original_rope": True,
        "padded_vocab_size": 512,
        "post_layer_norm": True,
        "rmsnorm": True,
        "seq_length": 131072,
        "use_cache": True,
        "torch_dtype": dtype,
        "transformers_version": "4.44.0",
        "tie_word_embeddings": False,
        "eos_token_id": [151329, 151336, 151338],
        "pad_token_id": 151329,
    }


def make_glm4_checkpoint(directory: Path, dtype: str = "float32", seed: int = 0) -> dict:
    cfg = glm4_config(dtype)
    gen = torch.Generator().manual_seed(seed)
    h, f, v = cfg["hidden_size"], cfg["ffn_hidden_size"], cfg["padded_vocab_size"]
    nh, d, g = cfg["num_attention_heads"], cfg["kv_channels"], cfg["multi_query_group_num"]

    def rnd(*shape, scale=0.15, offset=0.0):
        return offset + scale * torch.randn(*shape, generator=gen)

    sd = {"transformer.embedding.word_embeddings.weight": rnd(v, h, scale=1.0)}
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        sd[p + "input_layernorm.weight"] = rnd(h, scale=0.1, offset=1.0)
        sd[p + "self_attention.query_key_value.weight"] = rnd((nh + 2 * g) * d, h)
        sd[p + "self_attention.query_key_value.bias"] = rnd((nh + 2 * g) * d, scale=0.1)
        sd[p + "self_attention.dense.weight"] = rnd(h, nh * d)
        sd[p + "post_attention_layernorm.weight"] = rnd(h, scale=0.1, offset=1.0)
        sd[p + "mlp.dense_h_to_4h.weight"] = rnd(2 * f, h)
        sd[p + "mlp.dense_4h_to_h.weight"] = rnd(h, f)
    sd["transformer.encoder.final_layernorm.weight"] = rnd(h, scale=0.1, offset=1.0)
    sd["transformer.output_layer.weight"] = rnd(v, h)
    torch_dtype = getattr(torch, dtype)
    sd = {k: t.to(torch_dtype) for k, t in sd.items()}
    # the buffer as RotaryEmbedding.__init__ builds it: base 1e4, rotary dim kv_channels // 2
    dim = d // 2
    sd["transformer.rotary_pos_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, dim, 2).to(dtype=torch_dtype) / dim))
    directory.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "ChatGLM4Tokenizer",
                "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]},
            }
        ),
        encoding="utf-8",
    )
    return cfg


def write_raising_remote_code(directory: Path) -> None:
    for name in ("modeling_chatglm.py", "configuration_chatglm.py", "tokenization_chatglm.py"):
        (directory / name).write_text("raise RuntimeError('remote code must not run')\n", encoding="utf-8")


# --- plugin registration and claims ---------------------------------------------------------------


def test_plugin_provides_both_families():
    assert get_plugins().families_of("chatglm") == ["chatglm3", "glm4"]


def claimed(config, path):
    """The family famtune's claim picks for ``config``, or None when no family claims it."""
    try:
        return get_plugins().claim(config, path).name
    except FamtuneError:
        return None


def test_claims(tmp_path):
    assert claimed(ORIGINAL_CONFIG, str(TINY)) == "chatglm3"
    glm4 = tmp_path / "glm4"
    make_glm4_checkpoint(glm4)
    assert claimed(json.loads((glm4 / "config.json").read_text()), str(glm4)) == "glm4"
    # the released GLM-4 config is recognised even without its tokenizer_config.json
    assert claimed(glm4_config("bfloat16"), str(tmp_path)) == "glm4"
    native = {"model_type": "glm", "architectures": ["GlmForCausalLM"]}
    assert claimed({**native, "famtune_family": "glm4"}, str(tmp_path)) == "glm4"
    assert claimed(native, str(tmp_path)) is None  # no marker: not ours
    assert claimed({"model_type": "llama"}, str(tmp_path)) is None
    # ChatGLM-6B (v1) shares model_type "chatglm" but is another architecture
    v1 = {"model_type": "chatglm", "position_encoding_2d": True, "inner_hidden_size": 16384, "vocab_size": 130528}
    assert claimed(v1, str(tmp_path)) is None
    chatglm2 = {**ORIGINAL_CONFIG, "_name_or_path": "THUDM/chatglm2-6b"}
    assert claimed(chatglm2, str(tmp_path)) is None


# --- ChatGLM3 model -------------------------------------------------------------------------------


def test_chatglm3_tiny_matches_reference_logits_and_greedy(famtune_cache, record_property):
    ckpt = open_checkpoint(str(TINY))
    assert ckpt.family.name == "chatglm3"
    model = ckpt.load_model(quantization="none", compute_dtype="fp32")
    assert type(model).__name__ == "GlmForCausalLM"
    assert Path(model.name_or_path).is_relative_to(famtune_cache)  # converted into the cache only
    ref = load_file(str(REF / "reference_logits.safetensors"))
    worst = 0.0
    for seq in REFERENCE["sequences"]:
        ids = torch.tensor([seq["input_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0]
        worst = max(worst, (logits - ref[f"seq{seq['index']}.logits"]).abs().max().item())
        out = model.generate(ids, do_sample=False, max_new_tokens=5, use_cache=True, eos_token_id=None, pad_token_id=0)
        assert out[0, ids.shape[1] :].tolist() == seq["generate_greedy"] == seq["greedy_next_5"]
    record_property("max_abs_logit_diff", worst)
    print(f"chatglm3 tiny: max abs logit diff vs reference = {worst:.3g}")
    assert worst <= 1e-4


def test_reference_forward_reproduces_the_original_code():
    # Validates original_forward (used for GLM-4 below) against the remote code's own logits.
    sd = load_file(str(TINY / "model.safetensors"))
    ref = load_file(str(REF / "reference_logits.safetensors"))
    for seq in REFERENCE["sequences"]:
        logits = original_forward(sd, ORIGINAL_CONFIG, seq["input_ids"])
        assert (logits - ref[f"seq{seq['index']}.logits"]).abs().max().item() <= 1e-4


def test_remote_code_is_never_imported(tmp_path):
    ckpt_dir = tmp_path / "chatglm3"
    shutil.copytree(TINY, ckpt_dir)
    shutil.copy(TOKENIZER / "tokenizer.model", ckpt_dir)
    shutil.copy(TOKENIZER / "tokenizer_config.json", ckpt_dir)
    write_raising_remote_code(ckpt_dir)
    ckpt = open_checkpoint(str(ckpt_dir))
    model = ckpt.load_model(quantization="none", compute_dtype="fp32")
    seq = REFERENCE["sequences"][0]
    with torch.no_grad():
        logits = model(torch.tensor([seq["input_ids"]])).logits[0]
    expected = load_file(str(REF / "reference_logits.safetensors"))["seq0.logits"]
    assert (logits - expected).abs().max().item() <= 1e-4
    tok = ckpt.load_tokenizer()
    assert tok("Hello")["input_ids"][:2] == [64790, 64792]


def test_nf4_load_gives_linear4bit_and_finite_loss():
    from bitsandbytes.nn import Linear4bit

    ckpt = open_checkpoint(str(TINY))
    model = ckpt.load_model(quantization="nf4", compute_dtype="fp32")
    quantized = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    assert len(quantized) == 2 * 6  # q, k, v, o, gate_up, down in each of the 2 layers
    assert not isinstance(model.get_output_embeddings(), Linear4bit)
    ids = torch.tensor([REFERENCE["sequences"][2]["input_ids"]])
    loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss)
    assert ckpt.family.lora_target_modules(model, "all-linear") == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
    )


def test_lora_targets_are_native_names_and_never_the_head():
    ckpt = open_checkpoint(str(TINY))
    model = ckpt.load_model(quantization="none", compute_dtype="fp32")
    assert ckpt.family.lora_target_modules(model, "default") == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_up_proj",
        "down_proj",
    ]
    assert "lm_head" not in ckpt.family.lora_target_modules(model, "all-linear")


# --- layout round trips ---------------------------------------------------------------------------


def assert_same_checkpoint(original: Path, written: Path) -> None:
    a, b = tensors_of(original), tensors_of(written)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name
    assert json.loads((written / "config.json").read_text()) == json.loads((original / "config.json").read_text())


def test_chatglm3_round_trip_is_bit_exact(tmp_path):
    native = tmp_path / "native"
    layout.write_native(TINY, native, "chatglm3", ORIGINAL_CONFIG)
    assert not any(k.startswith("transformer.") for k in tensors_of(native))
    fam = family("chatglm3")
    assert fam.write_original_layout(str(native), str(tmp_path / "back"), ORIGINAL_CONFIG)
    assert_same_checkpoint(TINY, tmp_path / "back")


def test_round_trip_from_a_model_saved_by_transformers(tmp_path):
    # what a merge writes: the loaded native model saved with save_pretrained
    ckpt = open_checkpoint(str(TINY))
    model = ckpt.load_model(quantization="none", compute_dtype="fp32")
    model.save_pretrained(tmp_path / "merged")
    assert open_checkpoint(str(tmp_path / "merged")).family.name == "chatglm3"  # marker survives saving
    assert ckpt.family.write_original_layout(str(tmp_path / "merged"), str(tmp_path / "back"), ORIGINAL_CONFIG)
    assert_same_checkpoint(TINY, tmp_path / "back")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_glm4_round_trip_is_bit_exact(tmp_path, dtype):
    src = tmp_path / "glm4"
    cfg = make_glm4_checkpoint(src, dtype)
    native = tmp_path / "native"
    layout.write_native(src, native, "glm4", cfg)
    native_cfg = json.loads((native / "config.json").read_text())
    assert native_cfg["famtune_family"] == "glm4"
    assert native_cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.5}
    assert native_cfg["rms_norm_eps"] == 1.5625e-07
    assert (native_cfg["num_key_value_heads"], native_cfg["head_dim"], native_cfg["vocab_size"]) == (2, 16, 512)
    assert family("glm4").write_original_layout(str(native), str(tmp_path / "back"), cfg)
    assert_same_checkpoint(src, tmp_path / "back")


def test_glm4_loads_natively_and_matches_the_original_forward(tmp_path):
    src = tmp_path / "glm4"
    cfg = make_glm4_checkpoint(src, "float32", seed=7)
    write_raising_remote_code(src)
    ckpt = open_checkpoint(str(src))
    assert ckpt.family.name == "glm4"
    model = ckpt.load_model(quantization="none", compute_dtype="fp32")
    ids = torch.randint(0, cfg["padded_vocab_size"], (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    sd = load_file(str(src / "model.safetensors"))
    assert (logits - original_forward(sd, cfg, ids)).abs().max().item() <= 1e-4
    # the check has teeth: GLM-4 with transformers' converter's rope_theta of 1e4 is far off
    wrong = original_forward(sd, {**cfg, "rope_ratio": 1}, ids)
    assert (logits - wrong).abs().max().item() > 1e-3


def test_weights_only_as_bin_are_refused(tmp_path):
    src = tmp_path / "bin_only"
    src.mkdir()
    shutil.copy(TINY / "config.json", src)
    (src / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(FamtuneError, match=r"no \*\.safetensors weights .*pytorch_model\.bin"):
        open_checkpoint(str(src)).load_model(quantization="none", compute_dtype="fp32")


def test_unsupported_config_is_refused(tmp_path):
    bad = {**ORIGINAL_CONFIG, "rmsnorm": False}
    with pytest.raises(FamtuneError, match="rmsnorm=False"):
        layout.write_native(TINY, tmp_path / "native", "chatglm3", bad)


# --- ChatGLM3 tokenizer and chat format -----------------------------------------------------------


def test_chatglm3_special_token_ids(glm3_tok):
    for token, tid in CHAT_IDS["special_token_ids"].items():
        assert glm3_tok.convert_tokens_to_ids(token) == tid
    assert len(glm3_tok) == CHAT_IDS["tokenizer_vocab_size"] == 64798
    assert (glm3_tok.eos_token_id, glm3_tok.pad_token_id) == (2, 0)


@pytest.mark.parametrize("name", sorted(CHAT_IDS["plain_strings"]))
def test_chatglm3_plain_strings(glm3_tok, name):
    case = CHAT_IDS["plain_strings"][name]
    assert glm3_tok(case["text"])["input_ids"] == case["input_ids"]
    assert glm3_tok(case["text"], add_special_tokens=False)["input_ids"] == case["input_ids_no_special"]
    assert glm3_tok.decode(case["input_ids"], skip_special_tokens=True) == case["text"]


@pytest.mark.parametrize("name", sorted(CHAT_IDS["conversations"]))
def test_chatglm3_conversations_match_build_chat_input(glm3_tok, name):
    case = CHAT_IDS["conversations"][name]
    expected = case["build_chat_input"]["input_ids"]
    enc = family("chatglm3").encode(glm3_tok, case["messages"], "all_assistant", add_generation_prompt=True)
    assert enc.input_ids == expected
    rendered = glm3_tok.apply_chat_template(case["messages"], add_generation_prompt=True, tokenize=True)
    assert rendered["input_ids"] == expected


def test_chatglm3_empty_system_message_keeps_its_block(glm3_tok):
    """build_chat_input writes <|system|> and the header newline (sp("\\n") = 30910, 13) even for an
    empty system message, and nothing for its empty content."""
    case = CHAT_IDS["conversations"]["c1_single_user"]
    messages = [{"role": "system", "content": ""}, *case["messages"]]
    prefix, rest = case["build_chat_input"]["input_ids"][:2], case["build_chat_input"]["input_ids"][2:]
    expected = [*prefix, CHAT_IDS["special_token_ids"]["<|system|>"], 30910, 13, *rest]
    fam = family("chatglm3")
    assert fam.encode(glm3_tok, messages, "all_assistant", add_generation_prompt=True).input_ids == expected
    glm3_tok.chat_template = fam.chat_template()
    assert glm3_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"] == expected


def chatglm3_training_sample():
    """c3_multi_turn plus a final reply whose ids the fixture knows (a plain string's)."""
    case = CHAT_IDS["conversations"]["c3_multi_turn"]
    reply = CHAT_IDS["plain_strings"]["english"]
    messages = case["messages"] + [{"role": "assistant", "content": reply["text"]}]
    prompt = case["build_chat_input"]["input_ids"]  # ends with <|assistant|>
    first = prompt.index(64796)  # first reply: <|assistant|> ▁ \n content, closed by <|user|>
    closing_user = prompt.index(64795, first)
    header = prompt[first + 1 : first + 3]
    ids = prompt + header + reply["input_ids_no_special"] + [2]
    return messages, ids, (first, closing_user), header


def test_chatglm3_golden_labels_for_every_policy(glm3_tok):
    messages, ids, (first, closing_user), header = chatglm3_training_sample()
    fam = family("chatglm3")
    assert fam.masking_policies() == ["all_assistant", "last_turn", "train_on_prompt", "chatglm3_official"]
    n = len(ids)
    second = len(ids) - len(CHAT_IDS["plain_strings"]["english"]["input_ids_no_special"]) - 1  # first content id
    assert ids[second - 3 : second] == [64796, *header]

    def keep(*ranges):
        positions = {i for a, b in ranges for i in range(a, b)}
        return [t if i in positions else IGNORE_INDEX for i, t in enumerate(ids)]

    golden = {
        # the "▁\n" header the model writes after <|assistant|>, the content, and the end-of-turn
        # token (<|user|> that follows, </s> after the last reply)
        "all_assistant": keep((first + 1, closing_user + 1), (second - 2, n)),
        "last_turn": keep((second - 2, n)),
        "train_on_prompt": list(ids),
        # official shifted mask: the same tokens for a plain conversation
        "chatglm3_official": keep((first + 1, closing_user + 1), (second - 2, n)),
    }
    for policy, labels in golden.items():
        enc = fam.encode(glm3_tok, messages, policy)
        assert enc.input_ids == ids, policy
        assert enc.labels == labels, policy
    assert glm3_tok.apply_chat_template(messages, tokenize=True)["input_ids"] == ids


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}],
        [
            {"role": "system", "content": ""},
            {"role": "user", "content": "  two leading spaces\n\n"},
            {"role": "assistant", "content": "\nstarts with a newline"},
        ],
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "A"},
            {"role": "user", "content": "🙏 again"},
        ],
    ],
)
def test_chatglm3_chat_template_equals_encode(glm3_tok, messages):
    fam = family("chatglm3")
    tok = glm3_tok
    tok.chat_template = fam.chat_template()
    gen = messages[-1]["role"] == "user"
    enc = fam.encode(tok, messages, "all_assistant", add_generation_prompt=gen)
    assert tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)["input_ids"] == enc.input_ids


def test_chatglm3_user_text_spelling_control_tokens_stays_text(glm3_tok):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(TOKENIZER / "tokenizer.model"))
    text = "ignore this <|user|> [gMASK]sop </s> <|observation|> isopropyl"
    enc = family("chatglm3").encode(
        glm3_tok, [{"role": "user", "content": text}], "all_assistant", add_generation_prompt=True
    )
    assert enc.input_ids == [64790, 64792, 64795, 30910, 13, *sp.encode(text), 64796]
    # plain tokenizer calls keep "sop" inside words as text
    assert glm3_tok("isopropyl", add_special_tokens=False)["input_ids"] == sp.encode("isopropyl")


def test_chatglm3_generation_defaults(glm3_tok):
    gen = family("chatglm3").generation_defaults(glm3_tok)
    assert gen.stop_ids == [2, 64795, 64797]
    assert gen.sampling == {"do_sample": True, "temperature": 0.8, "top_p": 0.8}


def test_conversation_templates():
    conv = family("chatglm3").conversation_template()
    assert conv.name == "famtune-chatglm3" and conv.stop_token_ids == [2, 64795, 64797]
    assert family("glm4").conversation_template().stop_token_ids == [151329, 151336, 151338]


# --- GLM-4 tokenizer and chat format (vocabulary built here; see the module docstring) ------------


def test_glm4_special_ids_follow_the_vocabulary(glm4_tok):
    ids = glm4_tok.convert_tokens_to_ids(GLM4_SPECIALS)
    assert ids == list(range(GLM4_RANKS, GLM4_RANKS + 14))
    assert ids[:5] == [151329, 151330, 151331, 151332, 151333]  # <|endoftext|> [MASK] [gMASK] [sMASK] <sop>
    assert glm4_tok.eos_token_id == glm4_tok.pad_token_id == 151329
    gen = family("glm4").generation_defaults(glm4_tok)
    assert gen.stop_ids == [151329, 151336, 151338]
    assert gen.sampling == {"do_sample": True, "temperature": 0.8, "top_p": 0.8}


@pytest.mark.parametrize("text", ["Hello world!\n\nHello  world", "你好 😀\tcode  x = 1\n", "'re 12345 <|user|>"])
def test_glm4_text_matches_tiktoken(glm4_tok, glm4_reference, text):
    plain = glm4_tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert plain == glm4_reference.encode_ordinary(text)
    assert glm4_tok(text)["input_ids"][:2] == [151331, 151333]
    assert glm4_tok.decode(plain) == text


def test_glm4_conversation_ids_and_golden_labels(glm4_tok, glm4_reference):
    enc = glm4_reference.encode_ordinary
    system, user, reply1, user2, reply2 = "Be brief.", "Hello world", "Hello", "<|user|> again", "\n\nHello"
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": user},
        {"role": "assistant", "content": reply1},
        {"role": "user", "content": user2},
        {"role": "assistant", "content": reply2},
    ]
    S = {t: GLM4_RANKS + i for i, t in enumerate(GLM4_SPECIALS)}
    nl = enc("\n")
    # role id, then "\n" + content tokenized as one piece (GLM-4's apply_chat_template)
    parts = [
        ("prefix", [S["[gMASK]"], S["<sop>"]]),
        ("prompt", [S["<|system|>"], *enc("\n" + system), S["<|user|>"], *enc("\n" + user), S["<|assistant|>"]]),
        ("header1", nl),
        ("reply1", enc("\n" + reply1)[len(nl) :]),
        ("end1", [S["<|user|>"]]),
        ("prompt2", [*enc("\n" + user2), S["<|assistant|>"]]),
        # "\n\n" is one token of this vocabulary, so the header merges into the reply's first token
        ("reply2", enc("\n" + reply2)),
        ("end2", [S["<|user|>"]]),
    ]
    assert enc("\n" + reply2)[0] == glm4_reference.encode_single_token(b"\n\n")
    ids = [t for _, p in parts for t in p]

    def labels(*names):
        return [t for name, p in parts for t in (p if name in names else [IGNORE_INDEX] * len(p))]

    golden = {
        # the header newline is generated by the model after <|assistant|>, so it is supervised too
        "all_assistant": labels("header1", "reply1", "end1", "reply2", "end2"),
        "last_turn": labels("reply2", "end2"),
        "train_on_prompt": list(ids),
        "glm4_official": labels("header1", "reply1", "end1", "reply2", "end2"),
    }
    fam = family("glm4")
    assert fam.masking_policies() == list(golden)
    for policy, want in golden.items():
        got = fam.encode(glm4_tok, messages, policy)
        assert got.input_ids == ids, policy
        assert got.labels == want, policy
    # the template renders "<|user|>" typed in content as a control token; everything else matches
    plain = [m if m["content"] != user2 else {**m, "content": "again"} for m in messages]
    assert (
        glm4_tok.apply_chat_template(plain, tokenize=True)["input_ids"]
        == fam.encode(glm4_tok, plain, "all_assistant").input_ids
    )
    prompt = fam.encode(glm4_tok, messages[:2], "all_assistant", add_generation_prompt=True)
    assert prompt.input_ids == ids[: len(parts[0][1]) + len(parts[1][1])]
    assert (
        glm4_tok.apply_chat_template(messages[:2], add_generation_prompt=True, tokenize=True)["input_ids"]
        == prompt.input_ids
    )


def test_glm4_tokenizer_is_loaded_from_a_checkpoint_without_remote_code(tmp_path):
    src = tmp_path / "glm4"
    make_glm4_checkpoint(src)
    tokens = [bytes([i]) for i in range(256)] + [b"He", b"llo", b"Hello"]
    (src / "tokenizer.model").write_text(
        "".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)), encoding="utf-8"
    )
    write_raising_remote_code(src)
    tok = open_checkpoint(str(src)).load_tokenizer()
    gmask, sop = len(tokens) + 2, len(tokens) + 4
    assert tok("Hello")["input_ids"] == [gmask, sop, tokens.index(b"Hello")]
    tok.save_pretrained(tmp_path / "saved")
    again = family("glm4").load_tokenizer(str(tmp_path / "saved"), trust_remote_code=False)
    assert again("Hello world")["input_ids"] == tok("Hello world")["input_ids"]


def test_unknown_role_and_policy_are_refused(glm3_tok):
    fam = family("chatglm3")
    with pytest.raises(FamtuneError, match="role 'bot'"):
        fam.encode(glm3_tok, [{"role": "bot", "content": "x"}], "all_assistant")
    with pytest.raises(FamtuneError, match="unknown masking policy 'glm4_official'"):
        fam.encode(glm3_tok, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "glm4_official")


def test_source_directory_is_never_written(tmp_path):
    src = tmp_path / "readonly"
    shutil.copytree(TINY, src)
    for p in [src, *src.iterdir()]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        open_checkpoint(str(src)).load_model(quantization="none", compute_dtype="fp32")
        assert sorted(p.name for p in src.iterdir()) == sorted(p.name for p in TINY.iterdir())
    finally:
        src.chmod(0o755)


def test_padded_embedding_rows_decode_to_nothing(glm3_tok, glm4_tok):
    # Real checkpoints have more embedding rows than tokens; an id past the tokenizer must not crash chat.
    assert glm3_tok.decode([30910, 13, len(glm3_tok) + 100, 64795]) == "\n<|user|>"
    tail = glm4_tok.convert_tokens_to_ids("<|user|>")
    assert glm4_tok.decode([len(glm4_tok) + 5, tail]) == "<|user|>"
