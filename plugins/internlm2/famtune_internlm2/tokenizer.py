"""InternLM2's SentencePiece tokenizer as a transformers tokenizer, built without remote code.

The published tokenizer is ``tokenizer.model`` (a SentencePiece BPE model) plus
``tokenizer_config.json``, whose ``added_tokens_decoder`` renames six of the model's pieces
(``[UNUSED_TOKEN_141..146]``) to the chat control tokens (``<|im_start|>`` = 92543, ...). The
remote ``InternLM2Tokenizer`` splits text on those tokens and runs SentencePiece on the rest.

This module rebuilds that behaviour as a ``tokenizers`` BPE model, reading the SentencePiece
file with a small protobuf reader (the ``protobuf`` package is not a famtune dependency):

- the normalizer only escapes spaces as ``▁`` (InternLM2's spec is ``identity``, with no dummy
  prefix and no whitespace folding; any other spec is refused rather than approximated);
- merges are ranked by piece score, as SentencePiece ranks them;
- user-defined pieces (fullwidth letters, ``——``, ``[UNUSED_TOKEN_n]``) are emitted whole and
  never merged, so they become non-special added tokens;
- SentencePiece >= 0.2 treats a ``"\\0"`` piece as unused when byte fallback is on, so a NUL
  character encodes as the byte ``<0x00>``, not as that piece; the piece gets a name no text
  can produce.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# SentencePiece piece types (sentencepiece_model.proto)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BPE_MODEL = 2

TOKENIZER_CLASSES = ("InternLM2Tokenizer", "InternLM2TokenizerFast")


@dataclass
class SpmModel:
    """The parts of a SentencePiece ``ModelProto`` that decide how text becomes ids."""

    pieces: list[tuple[str, float, int]] = field(default_factory=list)  # (piece, score, type)
    model_type: int = 1
    byte_fallback: bool = False
    unk_piece: str = "<unk>"
    normalizer_name: str = "nmt_nfkc"
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(buf: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value) pairs of one protobuf message; nested messages stay bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i : i + n], i + n
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, value


def read_spm_model(path: str | os.PathLike) -> SpmModel:
    """Parse a SentencePiece ``.model`` file (field numbers from sentencepiece_model.proto)."""
    try:
        buf = Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found; an InternLM2 checkpoint needs its tokenizer.model") from None
    model = SpmModel()
    try:
        for number, value in _fields(buf):
            if number == 1:  # SentencePiece
                piece, score, ptype = "", 0.0, NORMAL
                for n, v in _fields(value):
                    if n == 1:
                        piece = v.decode("utf-8")
                    elif n == 2:
                        score = struct.unpack("<f", v)[0]
                    elif n == 3:
                        ptype = v
                model.pieces.append((piece, score, ptype))
            elif number == 2:  # TrainerSpec
                for n, v in _fields(value):
                    if n == 3:
                        model.model_type = v
                    elif n == 35:
                        model.byte_fallback = bool(v)
                    elif n == 45:
                        model.unk_piece = v.decode("utf-8")
            elif number == 3:  # NormalizerSpec
                for n, v in _fields(value):
                    if n == 1:
                        model.normalizer_name = v.decode("utf-8")
                    elif n == 2:
                        model.precompiled_charsmap = bytes(v)
                    elif n == 3:
                        model.add_dummy_prefix = bool(v)
                    elif n == 4:
                        model.remove_extra_whitespaces = bool(v)
                    elif n == 5:
                        model.escape_whitespaces = bool(v)
    except (IndexError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"{path}: not a readable SentencePiece model ({exc}); check the file is not an LFS pointer"
        ) from None
    if not model.pieces:
        raise ValueError(f"{path}: holds no SentencePiece pieces; check the file is not a Git LFS pointer")
    return model


def check_supported(model: SpmModel, path: str | os.PathLike) -> None:
    """Refuse settings this builder does not reproduce, instead of producing different ids."""
    problems = []
    if model.model_type != BPE_MODEL:
        problems.append(f"model_type {model.model_type} (expected BPE)")
    if model.precompiled_charsmap or model.normalizer_name not in ("identity", ""):
        problems.append(f"normalizer {model.normalizer_name!r} (expected identity)")
    if model.add_dummy_prefix:
        problems.append("add_dummy_prefix true")
    if model.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces true")
    if not model.escape_whitespaces:
        problems.append("escape_whitespaces false")
    if problems:
        raise ValueError(
            f"{path}: SentencePiece settings {', '.join(problems)} differ from InternLM2's; "
            "this is not an InternLM2 tokenizer, pass the checkpoint's own tokenizer.model"
        )


def added_tokens(tokenizer_config: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """``added_tokens_decoder`` of ``tokenizer_config.json`` as id -> token fields."""
    return {int(i): tok for i, tok in (tokenizer_config.get("added_tokens_decoder") or {}).items()}


def build_backend(model: SpmModel, added: dict[int, dict[str, Any]]):
    """A ``tokenizers.Tokenizer`` that encodes like SentencePiece plus InternLM2's added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    beyond = sorted(i for i in added if i >= len(model.pieces))
    if beyond:
        raise ValueError(
            f"tokenizer_config.json adds token ids {beyond} beyond the {len(model.pieces)} pieces "
            "of tokenizer.model; these files do not belong together"
        )
    unused = {
        i
        for i, (piece, _, ptype) in enumerate(model.pieces)
        if ptype == UNUSED or (ptype == NORMAL and piece == "\0" and model.byte_fallback)
    }
    names: list[str] = []
    for i, (piece, _, _) in enumerate(model.pieces):
        if i in added:
            names.append(added[i]["content"])
        elif i in unused:
            names.append(f"<famtune_unused_piece_{i}>")  # kept for the id, unreachable from text
        else:
            names.append(piece)
    vocab = {name: i for i, name in enumerate(names)}
    if len(vocab) != len(names):
        raise ValueError("the tokenizer's pieces and added tokens give duplicate token names")

    # SentencePiece merges two symbols when their concatenation is a piece, highest score
    # first; only normal pieces take part (user-defined ones are frozen whole).
    normal = {
        piece: (score, i)
        for i, (piece, score, ptype) in enumerate(model.pieces)
        if ptype == NORMAL and i not in unused and i not in added
    }
    ranked = []
    for piece, (score, i) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, i, cut, left, right))
    merges = [(left, right) for *_, left, right in sorted(ranked)]

    backend = Tokenizer(
        BPE(vocab=vocab, merges=merges, unk_token=model.unk_piece, fuse_unk=True, byte_fallback=model.byte_fallback)
    )
    # SentencePiece still emits a renamed user-defined piece for its old spelling (the remote
    # tokenizer maps the text "[UNUSED_TOKEN_145]" to 92542 too), so the old spelling is
    # rewritten to the new one before the renamed tokens are matched.
    renamed = {
        i: added[i]["content"]
        for i, (piece, _, ptype) in enumerate(model.pieces)
        if i in added and ptype == USER_DEFINED and added[i]["content"] != piece
    }
    backend.normalizer = normalizers.Sequence(
        [normalizers.Replace(model.pieces[i][0], new) for i, new in renamed.items()] + [normalizers.Replace(" ", "▁")]
    )
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])

    user_defined = [
        AddedToken(names[i], special=False, normalized=False)
        for i, (_, _, ptype) in enumerate(model.pieces)
        if ptype == USER_DEFINED and i not in added
    ]
    backend.add_tokens(user_defined)
    specials = [
        AddedToken(
            tok["content"],
            special=bool(tok.get("special", True)),
            normalized=i in renamed,
            lstrip=bool(tok.get("lstrip")),
            rstrip=bool(tok.get("rstrip")),
            single_word=bool(tok.get("single_word")),
        )
        for i, tok in sorted(added.items())
    ]
    control = [
        AddedToken(names[i], special=True, normalized=False)
        for i, (_, _, ptype) in enumerate(model.pieces)
        if ptype == CONTROL and i not in added
    ]
    backend.add_special_tokens(control + specials)
    return backend


def is_original_tokenizer_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` holds InternLM2's published tokenizer files (remote-code classes).

    ``tokenizer_config.json`` is required: only it says which pieces are the chat tokens.
    """
    cfg_path = Path(path) / "tokenizer_config.json"
    if not ((Path(path) / "tokenizer.model").is_file() and cfg_path.is_file()):
        return False
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    auto = json.dumps(cfg.get("auto_map") or {})
    return cfg.get("tokenizer_class") in TOKENIZER_CLASSES or any(c in auto for c in TOKENIZER_CLASSES)


def load_tokenizer(path: str | os.PathLike):
    """The checkpoint's tokenizer as a transformers fast tokenizer giving the original ids."""
    from transformers import PreTrainedTokenizerFast

    model_file = Path(path) / "tokenizer.model"
    model = read_spm_model(model_file)
    check_supported(model, model_file)
    with open(Path(path) / "tokenizer_config.json", encoding="utf-8") as f:
        cfg = json.load(f)
    backend = build_backend(model, added_tokens(cfg))

    def token(name: str, default: str | None) -> str | None:
        value = cfg.get(name, default)
        return value.get("content") if isinstance(value, dict) else value

    extra = [t if isinstance(t, str) else t.get("content") for t in cfg.get("additional_special_tokens") or []]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("bos_token", "<s>"),
        eos_token=token("eos_token", "</s>"),
        unk_token=token("unk_token", "<unk>"),
        pad_token=token("pad_token", "</s>"),
        extra_special_tokens=extra,
        add_bos_token=bool(cfg.get("add_bos_token", True)),
        add_eos_token=bool(cfg.get("add_eos_token", False)),
        clean_up_tokenization_spaces=False,
        model_max_length=cfg.get("model_max_length", int(1e30)),
        name_or_path=str(path),
    )
    if cfg.get("chat_template"):
        tok.chat_template = cfg["chat_template"]
    return tok
