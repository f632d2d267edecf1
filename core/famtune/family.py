"""What plugins register: model families, masking policies, data formats.

A family plugin's ``famtune_register_families(register)`` hands ``ModelFamily`` objects to famtune.
A family is mostly data (its chat format, LoRA targets, sampling defaults, packing support); the
methods below have defaults built from that data, and a family overrides only what differs
(a claim rule, a tokenizer or model loader for an original layout).

The core never calls these objects directly: ``famtune.plugins.Family`` wraps each one and
validates every answer, naming the plugin, its distribution and version when one is wrong.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from famtune.encoding import GENERIC_POLICIES, EncodedConversation
from famtune.types import GenerationDefaults

if TYPE_CHECKING:
    from famtune.chatformat import ChatFormat

#: The ``config.json`` key famtune writes into checkpoints it builds or converts (tiny models,
#: cached native copies): a checkpoint carrying it is claimed by the family it names, and only that.
MARKER_KEY = "famtune_family"


class ModelFamily:
    """One model family: how to recognise its checkpoints, talk to it and fine-tune it.

    Subclass it, set the class attributes, override what your family needs, and register an
    instance from ``famtune_register_families``. Methods returning ``None`` mean "famtune's
    default" (e.g. load with transformers).
    """

    #: The family name recipes and ``famtune.json`` use, e.g. ``"llama3"``.
    name: str = ""
    #: The chat format; ``encode``, ``chat_template`` and ``conversation`` derive from it.
    chat_format: ChatFormat | None = None
    #: Masking policies the encoder accepts; the first is the default. Keep the generic three.
    masking_policies: tuple[str, ...] = GENERIC_POLICIES
    #: LoRA target module suffixes for ``lora_targets: default``.
    lora_targets: tuple[str, ...] = ()
    #: ``transformers.GenerationConfig`` keyword arguments (the family's generation_config.json).
    sampling: dict[str, Any] = {}
    #: True if the model keeps packed samples apart given restarting position ids (the
    #: conformance suite checks it against each sample's logits alone).
    supports_packing: bool = False

    # -- recognising a checkpoint -----------------------------------------------------------------
    def claims(self, config: dict[str, Any], path: str) -> bool:
        """True if the checkpoint (its parsed ``config.json`` and directory) is this family's.

        Not asked when ``config`` carries the famtune marker: then the named family claims it.
        """
        return False

    # -- the chat format ------------------------------------------------------------------------
    def encode(
        self, tokenizer: Any, messages: list[dict[str, str]], masking: str, add_generation_prompt: bool
    ) -> EncodedConversation:
        return self._format().encode(tokenizer, messages, masking, add_generation_prompt)

    def chat_template(self) -> str:
        return self._format().jinja()

    def conversation(self):
        """A ``fastchat.conversation.Conversation``; its ``name`` is recorded in adapters."""
        return self._format().fastchat_conversation()

    def _format(self) -> ChatFormat:
        if self.chat_format is None:
            raise NotImplementedError(f"family {self.name!r} sets no chat_format and does not override this method")
        return self.chat_format

    # -- model --------------------------------------------------------------------------------
    def lora_target_modules(self, model: Any, mode: str) -> list[str]:
        """``mode`` is ``"default"`` (``lora_targets``) or ``"all-linear"`` (every linear but the head)."""
        if mode == "all-linear":
            return all_linear_modules(model)
        return list(self.lora_targets)

    def generation_defaults(self, tokenizer: Any) -> GenerationDefaults:
        return GenerationDefaults(self._format().stop_ids(tokenizer), dict(self.sampling))

    def load_tokenizer(self, path: str, trust_remote_code: bool) -> Any:
        """A tokenizer for ``path``, or ``None`` for ``transformers.AutoTokenizer``."""
        return None

    def load_model(self, path: str, load_kwargs: dict[str, Any]) -> Any:
        """A loaded ``PreTrainedModel``, or ``None`` for ``AutoModelForCausalLM.from_pretrained(path, **load_kwargs)``."""
        return None

    def write_original_layout(self, native_dir: str, out_dir: str, original_config: dict[str, Any]) -> bool | None:
        """Write the family's original layout of a merged native model; ``None`` if it has no other layout."""
        return None

    def tiny_checkpoint(self, out_dir: str, corpus: list[str]) -> bool | None:
        """Write a tiny random-weight checkpoint (conformance suite, ``famtune demo``); ``None`` if unable."""
        return None


def all_linear_modules(model: Any) -> list[str]:
    """Every linear layer's name suffix except the output head's (bitsandbytes' Linear4bit is a Linear)."""
    import torch

    head = model.get_output_embeddings()
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head
        }
    )


def chat_template_of(path: str) -> str:
    """The chat template a checkpoint ships (tokenizer_config.json's, else chat_template.jinja), or "".

    Many families share a ``model_type``; their published template is often what tells them apart.
    """
    try:
        with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
            tpl = json.load(f).get("chat_template") or ""
    except (OSError, ValueError):
        tpl = ""
    jinja = os.path.join(path, "chat_template.jinja")
    if not tpl and os.path.exists(jinja):
        with open(jinja, encoding="utf-8") as f:
            tpl = f.read()
    return tpl if isinstance(tpl, str) else json.dumps(tpl)


@dataclass(frozen=True)
class MaskingPolicy:
    """A labelling rule any family can use: which tokens of an encoded conversation are supervised.

    ``label`` receives the conversation encoded under ``all_assistant`` (whose ``turns`` say, per
    token, which assistant turn it belongs to, ``None`` for prompt tokens) and returns the labels.
    ``families`` limits the policy to those family names (``None``: every family).
    """

    name: str
    label: Callable[[EncodedConversation], list[int]]
    description: str = ""
    families: tuple[str, ...] | None = None


@dataclass(frozen=True)
class DataFormat:
    """A training-data record format: the one key that marks it, and how to read a record.

    ``to_messages`` turns one JSON object into ``[{"role": ..., "content": ...}, ...]``; it raises
    ``ValueError`` with a message the user can act on for a bad record.
    """

    name: str
    marker_key: str
    to_messages: Callable[[dict[str, Any]], list[dict[str, str]]]
    description: str = ""


@dataclass
class Registry:
    """Everything registered through the registrar hooks, by name, with who registered it."""

    families: dict[str, tuple[ModelFamily, str]] = field(default_factory=dict)
    masking_policies: dict[str, tuple[MaskingPolicy, str]] = field(default_factory=dict)
    data_formats: dict[str, tuple[DataFormat, str]] = field(default_factory=dict)
