"""Baichuan2's SentencePiece tokenizer, loaded without its remote ``tokenization_baichuan.py``.

The published tokenizer class fails on transformers >= 4.34 (it calls ``super().__init__()``
before it loads ``sp_model``; Baichuan2 issues #204/#269, transformers #26882). This class is a
transformers SentencePiece tokenizer that reproduces the original's ids:

- text is encoded by ``sp_model.encode`` as is: no BOS/EOS (``add_bos_token``/``add_eos_token``
  are false in the published config) and no dummy-prefix handling of our own;
- ``<s>``, ``</s>`` and ``<unk>`` written in text become their ids 1, 2 and 0, because the original
  slow tokenizer (transformers 4.33) split text on its special tokens. Their published
  ``single_word: true`` flag had no effect on that tokenizer, while transformers 5 would honour it
  and stop splitting ``a</s>``; so the flag is dropped here;
- ``<reserved_106>``/``<reserved_107>`` (user/assistant markers, ids 195/196) are USER_DEFINED
  pieces of the SentencePiece model itself, so text that spells them becomes 195/196 in the
  original and here alike.
"""

from __future__ import annotations

import json
import os
from typing import Any

from transformers import AddedToken
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from famtune.errors import FamtuneError

MODEL_FILE = "tokenizer.model"
# Baichuan2's tokenizer_config.json: pad is <unk> (id 0), bos <s> (1), eos </s> (2).
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}


class Baichuan2Tokenizer(SentencePieceBackend):
    """The original ids from Baichuan2's ``tokenizer.model`` (see the module docstring)."""

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, **kwargs: Any) -> None:
        for key, content in SPECIAL_TOKENS.items():
            kwargs.setdefault(
                key, AddedToken(content, lstrip=False, rstrip=False, single_word=False, normalized=False, special=True)
            )
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(vocab_file=vocab_file, legacy=True, **kwargs)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        # SentencePiece's own decode restores spaces and byte-fallback pieces (emoji) exactly;
        # special tokens are kept as their text, as the original's decode did.
        out, pieces = [], []
        specials = set(self.all_special_tokens)
        for tok in tokens:
            if tok in specials:
                out.append(self.sp_model.decode(pieces))
                out.append(tok)
                pieces = []
            else:
                pieces.append(tok)
        out.append(self.sp_model.decode(pieces))
        return "".join(out)


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise FamtuneError(f"{path}: invalid JSON ({exc}); restore the file from the original checkpoint") from None
    return data if isinstance(data, dict) else {}


def load_tokenizer(path: str) -> Any:
    """The tokenizer in ``path`` (``tokenizer.model`` plus optional ``tokenizer_config.json``)."""
    model_file = os.path.join(path, MODEL_FILE)
    if not os.path.isfile(model_file):
        raise FamtuneError(
            f"{path}: no {MODEL_FILE}; a Baichuan2 checkpoint ships its SentencePiece {MODEL_FILE}, "
            "copy it from the original model repository into this directory"
        )
    config = _read_json(os.path.join(path, "tokenizer_config.json"))
    kwargs: dict[str, Any] = {}
    if isinstance(config.get("model_max_length"), int):
        kwargs["model_max_length"] = config["model_max_length"]
    chat_template = config.get("chat_template")
    jinja = os.path.join(path, "chat_template.jinja")
    if not chat_template and os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            chat_template = f.read()
    if isinstance(chat_template, str) and chat_template:
        kwargs["chat_template"] = chat_template
    tok = Baichuan2Tokenizer(model_file, **kwargs)
    tok.name_or_path = path
    return tok
