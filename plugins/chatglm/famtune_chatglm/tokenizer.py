"""ChatGLM3's tokenizer rebuilt from ``tokenizer.model`` without remote code, and the loader.

The original ``ChatGLMTokenizer`` is SentencePiece (64789 pieces, byte fallback) plus nine command
tokens appended after the SentencePiece vocabulary, in this order: ``[MASK] [gMASK] [sMASK] sop eop
<|system|> <|user|> <|assistant|> <|observation|>`` (64789..64797). ``add_special_tokens`` puts
``[gMASK] sop`` in front of a sequence. Every text chunk is handed to SentencePiece on its own, so
each chunk gets SentencePiece's dummy ``▁`` prefix, exactly as ``SPTokenizer.encode`` does.

Control tokens in text: the chat template writes them as text, so the tokenizer must turn them
back into ids. ``sop``/``eop`` are also ordinary substrings ("isopropyl"), so they are control
tokens only right after a ``[gMASK]``-style token. Conversation content is never scanned for
control tokens (``split_special_tokens=True`` in template.py), as in the original
``build_chat_input``, which hands message text straight to SentencePiece.
"""

from __future__ import annotations

import os
import re
from typing import Any

from transformers.tokenization_utils_base import AddedToken
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

COMMAND_TOKENS = (
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "sop",
    "eop",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
)
_CONTROL = re.compile(r"\[[gs]?MASK\](?:sop|eop)?|<\|(?:system|user|assistant|observation)\|>|</s>")


def split_on_control(text: str, pattern: re.Pattern[str]) -> list[tuple[str, bool]]:
    """``text`` as (chunk, is_control) pairs; a ``[gMASK]sop`` match yields two control tokens."""
    out: list[tuple[str, bool]] = []
    pos = 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            out.append((text[pos : m.start()], False))
        token = m.group(0)
        if token.startswith("[") and not token.endswith("]"):
            out += [(token[:-3], True), (token[-3:], True)]
        else:
            out.append((token, True))
        pos = m.end()
    if pos < len(text):
        out.append((text[pos:], False))
    return out


class ChatGLM3Tokenizer(SentencePieceBackend):
    """The ChatGLM3-6B tokenizer: original ids, built only from ``tokenizer.model``."""

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, **kwargs: Any) -> None:
        from sentencepiece import SentencePieceProcessor

        n = SentencePieceProcessor(model_file=vocab_file).get_piece_size()
        commands = {n + i: AddedToken(t, special=True, normalized=False) for i, t in enumerate(COMMAND_TOKENS)}
        # A saved tokenizer_config.json repeats these; the ids are fixed by the vocabulary size.
        kwargs["added_tokens_decoder"] = {**kwargs.get("added_tokens_decoder", {}), **commands}
        kwargs.setdefault("eos_token", "</s>")
        kwargs.setdefault("unk_token", "<unk>")
        kwargs.setdefault("pad_token", "<unk>")
        kwargs.setdefault("extra_special_tokens", list(COMMAND_TOKENS))
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        kwargs["special_tokens_pattern"] = "prefix_suffix"
        kwargs["legacy"] = True  # keep SentencePiece's dummy prefix on every chunk, as the original
        self.prefix_tokens = [n + 1, n + 3]  # [gMASK] sop
        self.suffix_tokens: list[int] = []
        super().__init__(vocab_file=vocab_file, **kwargs)
        self.command_ids = {t: n + i for i, t in enumerate(COMMAND_TOKENS)}

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        split = kwargs.pop("split_special_tokens", self.split_special_tokens)
        text, kwargs = self.prepare_for_tokenization(text, **kwargs)
        if split:
            return self._tokenize(text)
        tokens: list[str] = []
        for chunk, is_control in split_on_control(text, _CONTROL):
            if is_control:
                tokens.append(chunk)
            else:
                tokens.extend(self._tokenize(chunk))
        return tokens

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp_model.decode_pieces(tokens)

    def _decode(self, token_ids: Any, skip_special_tokens: bool = False, **kwargs: Any) -> str:
        # As SPTokenizer.decode: runs of SentencePiece ids through sp.decode, command tokens as text.
        ids = [int(token_ids)] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        # Checkpoints pad the embedding past the vocabulary (ChatGLM3: 65024 rows for 64798 tokens);
        # a barely trained model can emit such an id, which names no token and decodes to nothing.
        ids = [i for i in ids if i < len(self)]
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        text, run = [], []
        for i in ids:
            if i in skip:
                continue
            if i >= self.sp_model.get_piece_size():
                if run:
                    text.append(self.sp_model.decode(run))
                    run = []
                text.append(self._added_tokens_decoder[i].content)
            else:
                run.append(i)
        if run:
            text.append(self.sp_model.decode(run))
        return "".join(text)


def _is_sentencepiece(path: str) -> bool:
    # tiktoken vocabularies (GLM-4) are text lines "<base64> <rank>"; SentencePiece is a protobuf.
    with open(path, "rb") as f:
        head = f.read(64)
    return not re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+\n?.*", head, flags=re.S)


def load_tokenizer(family: str, path: str, chat_template: str) -> Any:
    """The family tokenizer from the original files in ``path``, or None when ``path`` has a
    tokenizer that transformers loads natively (e.g. a ``tokenizer.json``)."""
    vocab = os.path.join(path, "tokenizer.model")
    if not os.path.isfile(vocab):
        return None
    if family == "chatglm3":
        if not _is_sentencepiece(vocab):
            raise ValueError(
                f"{vocab}: not a SentencePiece model; a ChatGLM3 checkpoint needs ChatGLM3's tokenizer.model"
            )
        tok = ChatGLM3Tokenizer(vocab_file=vocab)
    else:
        from famtune_chatglm.tokenizer_glm4 import GLM4Tokenizer

        if _is_sentencepiece(vocab):
            raise ValueError(f"{vocab}: not a tiktoken vocabulary; a GLM-4 checkpoint needs GLM-4's tokenizer.model")
        tok = GLM4Tokenizer(vocab_file=vocab)
    tok.chat_template = chat_template
    return tok
