"""``famtune plugin new NAME``: write a ready-to-install family plugin package.

The package implements every hook for a working example family: a ChatML chat format on the
native transformers Llama architecture, with a tiny checkpoint, so it installs, is discovered
and passes ``famtune plugins check`` before its author changes a line. Its author then replaces
the format, the claim and the tiny model with the real family's.
"""
from __future__ import annotations

import re
from pathlib import Path
from string import Template

from famtune.errors import FamtuneError

NAME_RE = re.compile(r"[a-z][a-z0-9]*(?:[-.][a-z0-9]+)*")

PYPROJECT = '''\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "famtune family plugin: $name"
requires-python = ">=3.10"
dependencies = ["famtune>=0.1"]

[project.entry-points.famtune]
$entry = "$module.plugin"

[tool.setuptools]
packages = ["$module"]
'''

README = '''\
# $dist

A [famtune](https://github.com/) family plugin for the `$name` family.

    pip install -e .
    famtune plugins            # lists $entry
    famtune plugins check $entry
    pytest tests

Written by `famtune plugin new $name`: a ChatML format on the native Llama architecture.
Replace `template.py` (the chat format), the claim in `plugin.py` and `tiny.py` (the tiny model)
with your family's; the hook reference in famtune's docs/authors/hooks.md says what each hook
must return, and `famtune plugins check $entry` tells you what is still wrong.
'''

INIT = '''\
"""famtune family plugin for $name."""
'''

PLUGIN = '''\
"""famtune hook implementations for the $name family.

Only the ``@famtune.hookimpl`` functions live here; they import torch/transformers lazily (inside
the hooks) so that ``famtune --help`` stays fast.
"""
from __future__ import annotations

from typing import Any

import famtune

FAMILY = "$name"
MARKER_KEY = "famtune_family"


@famtune.hookimpl
def famtune_families() -> list[str]:
    return [FAMILY]


@famtune.hookimpl
def famtune_claim_checkpoint(config: dict[str, Any], path: str) -> str | None:
    # Claim only what is unmistakably this family. The tiny checkpoint carries a marker; add the
    # real checkpoints' own marks here (model_type, architectures, vocab_size, a tokenizer file).
    # Never claim a plain "llama" config without such a mark: other families share it.
    if config.get(MARKER_KEY) is not None:
        return FAMILY if config.get(MARKER_KEY) == FAMILY else None
    return None


@famtune.hookimpl
def famtune_conversation_template(family: str):
    from $module import template

    return template.conversation()


@famtune.hookimpl
def famtune_chat_template(family: str) -> str:
    from $module import template

    return template.CHAT_TEMPLATE


@famtune.hookimpl
def famtune_masking_policies(family: str) -> list[str]:
    from famtune.encoding import GENERIC_POLICIES

    return list(GENERIC_POLICIES)


@famtune.hookimpl
def famtune_encode_conversation(family, tokenizer, messages, masking, add_generation_prompt):
    from $module import template

    return template.encode(tokenizer, messages, masking, add_generation_prompt)


@famtune.hookimpl
def famtune_lora_target_modules(family: str, model: Any, mode: str) -> list[str]:
    from $module import template

    return template.all_linear(model) if mode == "all-linear" else list(template.TARGETS_DEFAULT)


@famtune.hookimpl
def famtune_generation_defaults(family: str, tokenizer: Any):
    from $module import template

    return template.generation_defaults(tokenizer)


@famtune.hookimpl
def famtune_load_tokenizer(family: str, path: str, trust_remote_code: bool):
    # None: the checkpoint's tokenizer files load with transformers.AutoTokenizer. Return a
    # tokenizer here if they need code (never run the checkpoint's own remote code).
    return None


@famtune.hookimpl
def famtune_load_model(family: str, path: str, load_kwargs: dict[str, Any]):
    # None: the checkpoint is in a native transformers layout. For an original layout, convert it
    # to a native one in a cache dir and return AutoModelForCausalLM.from_pretrained(cache, **load_kwargs).
    return None


@famtune.hookimpl
def famtune_write_original_layout(family: str, native_dir: str, out_dir: str, original_config: dict[str, Any]):
    # None: the native layout is the family's only layout.
    return None


@famtune.hookimpl
def famtune_tiny_checkpoint(family: str, out_dir: str, corpus: list[str]) -> bool:
    from $module import tiny

    return tiny.write_tiny_checkpoint(out_dir, corpus)


@famtune.hookimpl
def famtune_supports_packing(family: str) -> bool:
    # Native Llama keeps packed samples apart given restarting position ids; the conformance
    # suite verifies the claim on the tiny model.
    return True


@famtune.hookimpl
def famtune_recipe_dirs() -> list[str]:
    # Built-in recipes (`famtune recipes list`): return [os.path.join(os.path.dirname(__file__), "recipes")]
    # after adding a recipes/ folder of NAME.yaml files as package data.
    return []
'''

TEMPLATE = '''\
"""The $name chat format: ChatML.

Every message renders as ``<|im_start|>{role}\\\\n{content}<|im_end|>\\\\n``; a conversation without a
system message gets DEFAULT_SYSTEM. ``<|im_end|>`` ends a turn and is the stop token.
"""
from __future__ import annotations

from typing import Any

from fastchat.conversation import Conversation, SeparatorStyle

from famtune.encoding import ConversationBuilder, EncodedConversation
from famtune.types import GenerationDefaults

IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
DEFAULT_SYSTEM = "You are a helpful assistant."
TARGETS_DEFAULT = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SAMPLING = {"do_sample": True, "temperature": 0.7, "top_p": 0.8}

CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\\\n" + DEFAULT_SYSTEM + "<|im_end|>\\\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\\\n' + message['content'] + '<|im_end|>\\\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\\\n' }}{%- endif %}"
)


def conversation() -> Conversation:
    return Conversation(
        name="famtune-$name",
        system_template=IM_START + "system\\n{system_message}",
        system_message=DEFAULT_SYSTEM,
        roles=(IM_START + "user", IM_START + "assistant"),
        sep_style=SeparatorStyle.CHATML,
        sep=IM_END,
        stop_str=IM_END,
    )


def encode(tokenizer: Any, messages: list[dict[str, str]], masking: str,
           add_generation_prompt: bool) -> EncodedConversation:
    # Pieces are tokenized one by one and marked prompt or assistant, so every label's position is
    # known by construction (see famtune.encoding.ConversationBuilder).
    b = ConversationBuilder(tokenizer)
    start, end = b.token_id(IM_START), b.token_id(IM_END)
    if not messages or messages[0]["role"] != "system":
        messages = [{"role": "system", "content": DEFAULT_SYSTEM}, *messages]
    turn = 0
    for m in messages:
        b.prompt_ids([start])
        if m["role"] == "assistant":
            b.prompt_text("assistant\\n")
            b.assistant_text(m["content"], turn)
            b.assistant_ids([end], turn)  # the end-of-turn token is supervised: the model learns to stop
            turn += 1
        else:
            b.prompt_text(f"{m['role']}\\n{m['content']}")
            b.prompt_ids([end])
        b.prompt_text("\\n")
    if add_generation_prompt:
        b.prompt_ids([start])
        b.prompt_text("assistant\\n")
    return b.build(masking)


def generation_defaults(tokenizer: Any) -> GenerationDefaults:
    # Looked up by token string, so the tiny tokenizer and the real one both work.
    b = ConversationBuilder(tokenizer)
    return GenerationDefaults([b.token_id(IM_END), b.token_id(END_OF_TEXT)], dict(SAMPLING))


def all_linear(model: Any) -> list[str]:
    """Every linear layer's name suffix except the output head's (bitsandbytes' Linear4bit is a Linear)."""
    import torch

    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and module is not head})
'''

TINY = '''\
"""A tiny random-weight $name checkpoint for ``famtune plugins check`` and tests: nothing is downloaded."""
from __future__ import annotations

from $module import template

SPECIALS = [template.END_OF_TEXT, template.IM_START, template.IM_END]


def write_tiny_checkpoint(out_dir: str, corpus: list[str], seed: int = 0) -> bool:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from famtune.tiny import train_tokenizer

    tok = train_tokenizer(corpus, SPECIALS, vocab_size=1200, eos_token=template.IM_END,
                          pad_token=template.END_OF_TEXT)
    tok.chat_template = template.CHAT_TEMPLATE
    tok.save_pretrained(out_dir)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        tie_word_embeddings=False, initializer_range=0.25, bos_token_id=None,
        eos_token_id=tok.convert_tokens_to_ids(template.IM_END),
        pad_token_id=tok.convert_tokens_to_ids(template.END_OF_TEXT),
        famtune_family="$name",  # what famtune_claim_checkpoint recognises
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(out_dir)
    return True
'''

TESTS = '''\
"""Discovery and famtune's conformance suite, run against the installed plugin."""
from __future__ import annotations

import json
import subprocess
import sys

pytest_plugins = ["famtune.testing"]


def test_famtune_discovers_the_plugin():
    out = subprocess.run([sys.executable, "-m", "famtune.cli", "plugins", "--json"], capture_output=True,
                         text=True, check=True)
    listed = json.loads(out.stdout)
    [me] = [p for p in listed["plugins"] if p["name"] == "$entry"]
    assert me["distribution"] == "$dist" and me["families"] == ["$name"]
    assert not [b for b in listed["broken"] if b["name"] == "$entry"]


def test_conformance(famtune_conformance):
    famtune_conformance("$entry")
'''

FILES = {
    "pyproject.toml": PYPROJECT,
    "README.md": README,
    "$module/__init__.py": INIT,
    "$module/plugin.py": PLUGIN,
    "$module/template.py": TEMPLATE,
    "$module/tiny.py": TINY,
    "tests/test_plugin.py": TESTS,
}


def new_plugin(name: str, parent: str | None = None) -> Path:
    """Write ``famtune-NAME`` under ``parent`` (default: the current directory); return its path."""
    if not NAME_RE.fullmatch(name):
        raise FamtuneError(f"plugin name {name!r} is not usable; use lowercase letters, digits, '-' or '.', "
                           "starting with a letter, e.g. acme or acme-7b")
    values = {"name": name, "entry": name, "dist": f"famtune-{name}",
              "module": "famtune_" + re.sub(r"[-.]", "_", name)}
    out = Path(parent or ".") / values["dist"]
    if out.exists() and any(out.iterdir()):
        raise FamtuneError(f"{out} already exists and is not empty; choose another --dir or remove it")
    for rel, text in FILES.items():
        path = out / Template(rel).substitute(values)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(Template(text).substitute(values), encoding="utf-8")
    return out.resolve()
