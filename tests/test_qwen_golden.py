"""Golden prompts and labels for Qwen1.5/2, Qwen2.5 and Qwen3 against their official chat templates.

The tokenizer has the real Qwen vocabulary: Qwen2+ share Qwen1's 151,643 BPE ranks (read from the
reference ``qwen.tiktoken`` in ../shared) and put their control tokens at 151643 and up, so every
id below is the id the released tokenizers produce. The official templates are the released
``tokenizer_config.json`` chat templates with their tool-calling branches left out.
"""

from __future__ import annotations

import json

import pytest

from conftest import SHARED
from famtune.encoding import IGNORE_INDEX
from famtune.plugins import get_plugins

QWEN2_OFFICIAL = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN25_OFFICIAL = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    '{%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
    '(message.role == "assistant" and not message.tool_calls) %}'
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
QWEN3_OFFICIAL = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}"
    "{%- set index = (messages|length - 1) - loop.index0 %}"
    '{%- if ns.multi_step_tool and message.role == "user" and message.content is string and '
    "not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.content is string %}{%- set content = message.content %}{%- else %}{%- set content = '' %}{%- endif %}"
    '{%- if (message.role == "user") or (message.role == "system" and not loop.first) %}'
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}"
    '{%- elif message.role == "assistant" %}'
    "{%- set reasoning_content = '' %}"
    "{%- if message.reasoning_content is string %}{%- set reasoning_content = message.reasoning_content %}"
    "{%- else %}{%- if '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index %}"
    "{%- if loop.last or (not loop.last and reasoning_content) %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' "
    "+ content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
OFFICIAL = {"qwen2": QWEN2_OFFICIAL, "qwen2.5": QWEN25_OFFICIAL, "qwen3": QWEN3_OFFICIAL}

# Qwen2.5 and Qwen3 control tokens from 151646 on (Qwen3 adds the last four).
CONTROL_TOKENS = [
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
]

CONVERSATIONS = [
    [{"role": "user", "content": "你好，请介绍一下你自己"}, {"role": "assistant", "content": "我是通义千问。"}],
    [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "Arr, a pirate!"},
        {"role": "user", "content": "Where's the gold?\n  Tell me"},
        {"role": "assistant", "content": "Buried, 3 paces east.\nShh."},
    ],
    [
        {"role": "user", "content": "1+1=?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "and 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "You're welcome!"},
    ],
]


@pytest.fixture(scope="module")
def qwen_tokenizer(tmp_path_factory):
    import os

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from famtune_qwen.tokenizer import tokenizer_json

    os.environ.setdefault("FAMTUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
    spec = json.loads(tokenizer_json(SHARED / "fixtures/reference/qwen1/tokenizer/qwen.tiktoken").read_text())
    by_id = {t["id"]: t for t in spec["added_tokens"]}
    for offset, token in enumerate(CONTROL_TOKENS):
        by_id[151646 + offset]["content"] = token
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] <= 151646 + len(CONTROL_TOKENS) - 1]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]) == [
        151643,
        151644,
        151645,
        151667,
        151668,
    ]
    return tok


def _official_ids(tok, family, messages, add_generation_prompt, **kw):
    out = tok.apply_chat_template(
        messages, chat_template=OFFICIAL[family], tokenize=True, add_generation_prompt=add_generation_prompt, **kw
    )
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("family", ["qwen2", "qwen2.5", "qwen3"])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_training_ids_equal_the_official_template(qwen_tokenizer, family, conv):
    fam = get_plugins().claim({}, "", family=family)
    messages = CONVERSATIONS[conv]
    enc = fam.encode(qwen_tokenizer, messages, "all_assistant")
    assert enc.input_ids == _official_ids(qwen_tokenizer, family, messages, False)
    # and our own chat_template (written into merged tokenizers) agrees too
    ours = qwen_tokenizer.apply_chat_template(messages, chat_template=fam.chat_template(), tokenize=True)
    assert enc.input_ids == list(ours["input_ids"] if hasattr(ours, "keys") else ours)


@pytest.mark.parametrize("family", ["qwen2", "qwen2.5", "qwen3"])
def test_generation_prompt_equals_the_official_template(qwen_tokenizer, family):
    fam = get_plugins().claim({}, "", family=family)
    messages = CONVERSATIONS[1][:-1]
    enc = fam.encode(qwen_tokenizer, messages, "all_assistant", add_generation_prompt=True)
    kw = {"enable_thinking": False} if family == "qwen3" else {}
    assert enc.input_ids == _official_ids(qwen_tokenizer, family, messages, True, **kw)
    if family == "qwen3":
        assert enc.input_ids[-4:] == [151667, 271, 151668, 271]  # <think>\n\n</think>\n\n


def test_default_system_prompts(qwen_tokenizer):
    messages = CONVERSATIONS[0]
    text = {
        f: qwen_tokenizer.decode(
            get_plugins().claim({}, "", family=f).encode(qwen_tokenizer, messages, "all_assistant").input_ids
        )
        for f in ("qwen2", "qwen2.5", "qwen3")
    }
    assert text["qwen2"].startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert text["qwen2.5"].startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    )
    assert text["qwen3"].startswith("<|im_start|>user\n")


def _supervised_spans(tok, enc):
    spans, cur = [], []
    for tid, lab in zip(enc.input_ids, enc.labels):
        if lab != IGNORE_INDEX:
            assert lab == tid
            cur.append(tid)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    if cur:
        spans.append(tok.decode(cur))
    return spans


@pytest.mark.parametrize("family", ["qwen2", "qwen2.5", "qwen3"])
def test_labels_under_each_policy(qwen_tokenizer, family):
    fam = get_plugins().claim({}, "", family=family)
    messages = CONVERSATIONS[1]
    tok = qwen_tokenizer
    enc = fam.encode(tok, messages, "all_assistant")
    assert _supervised_spans(tok, enc) == ["Arr, a pirate!<|im_end|>", "Buried, 3 paces east.\nShh.<|im_end|>"]
    assert enc.labels.count(151645) == 2  # one end-of-turn label per assistant turn
    last = fam.encode(tok, messages, "last_turn")
    assert _supervised_spans(tok, last) == ["Buried, 3 paces east.\nShh.<|im_end|>"]
    prompt = fam.encode(tok, messages, "train_on_prompt")
    assert prompt.labels == prompt.input_ids
    assert fam.masking_policies()[0] == "all_assistant"


def test_stop_ids_and_targets(qwen_tokenizer, tiny_qwen25):
    from famtune.checkpoint import open_checkpoint

    for family in ("qwen2", "qwen2.5", "qwen3"):
        gen = get_plugins().claim({}, "", family=family).generation_defaults(qwen_tokenizer)
        assert gen.stop_ids == [151645, 151643]
    ckpt = open_checkpoint(str(tiny_qwen25))
    assert ckpt.family.name == "qwen2.5"  # claimed from the tokenizer's chat template
    model = ckpt.load_model(quantization="nf4", compute_dtype="fp32")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    targets = ckpt.family.lora_target_modules(model, "default")
    assert targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert "lm_head" not in ckpt.family.lora_target_modules(model, "all-linear")
