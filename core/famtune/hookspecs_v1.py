"""The first plugin contract (famtune 0.1): per-operation hooks called with a family name.

Deprecated: plugins register ``famtune.family.ModelFamily`` objects through
``famtune_register_families`` instead (docs/authors/migrating.md). Plugins implementing these hooks
keep working for one release; famtune wraps them in a ``ModelFamily`` and warns on load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from fastchat.conversation import Conversation

    from famtune.encoding import EncodedConversation
    from famtune.types import GenerationDefaults


class FamtuneDeprecationWarning(FutureWarning):
    """Shown on load for each old-contract hook a plugin implements (FutureWarning: shown by default)."""


_marker = pluggy.HookspecMarker("famtune")


def hookspec(fn=None, *, firstresult=False):
    """A deprecated spec: pluggy warns when a plugin implements it, naming the hook and what to use."""

    def mark(f):
        warning = FamtuneDeprecationWarning(
            f"{f.__name__} is famtune's old plugin contract and goes away in the next release; register a "
            "famtune.family.ModelFamily from famtune_register_families instead (see docs/authors/migrating.md)"
        )
        return _marker(firstresult=firstresult, warn_on_impl=warning)(f)

    return mark(fn) if fn is not None else mark


@hookspec
def famtune_families() -> list[str]:
    """Called by ``famtune plugins`` and in claim errors.

    Return the family names this plugin handles, e.g. ``["acme-7b", "acme-7b-chat"]``.
    Not firstresult: every plugin answers.
    """


@hookspec
def famtune_claim_checkpoint(config: dict[str, Any], path: str) -> str | None:
    """Called once per model load, on every plugin, before anything else is loaded.

    ``config`` is the checkpoint's parsed ``config.json``; ``path`` its local directory (other
    files there, such as ``tokenizer_config.json``, may be read). Return the family name if this
    plugin handles the checkpoint, else ``None``. Not firstresult: the core requires exactly one
    claim and reports zero or several as an error.
    """


@hookspec(firstresult=True)
def famtune_conversation_template(family: str) -> Conversation:
    """Called after the claim, on the claiming plugin only.

    Return a ``fastchat.conversation.Conversation`` describing the family's chat format
    (its ``name`` is the template name recorded in adapters). The core registers it in
    fastchat's template registry. Stops at first non-None result.
    """


@hookspec(firstresult=True)
def famtune_chat_template(family: str) -> str:
    """Called when a tokenizer is saved (merge), on the claiming plugin only.

    Return the Jinja ``chat_template`` whose ``apply_chat_template`` output equals, token for
    token, what ``famtune_encode_conversation`` produces. Stops at first non-None result.
    """


@hookspec(firstresult=True)
def famtune_masking_policies(family: str) -> list[str]:
    """Called when a recipe is resolved, on the claiming plugin only.

    Return the masking policy names ``famtune_encode_conversation`` accepts. The first is the
    default. Every plugin must accept the generic ``all_assistant``, ``last_turn`` and
    ``train_on_prompt``; family variants (e.g. an official recipe's) come after them.
    Stops at first non-None result.
    """


@hookspec(firstresult=True)
def famtune_encode_conversation(
    family: str,
    tokenizer: Any,
    messages: list[dict[str, str]],
    masking: str,
    add_generation_prompt: bool,
) -> EncodedConversation:
    """Called for every training sample and every chat turn, on the claiming plugin only.

    ``messages`` is a list of ``{"role": "system"|"user"|"assistant", "content": str}``; a missing
    system message means the family default. Return the model-ready ``input_ids`` and ``labels``
    (``-100`` where unsupervised) under the masking policy ``masking``. With
    ``add_generation_prompt`` the conversation ends with a user turn and the ids end with the
    assistant prefix the model continues from; labels are then ignored. Every assistant turn's
    end-of-turn token must be supervised under ``all_assistant``. Stops at first non-None result.
    """


@hookspec(firstresult=True)
def famtune_lora_target_modules(family: str, model: Any, mode: str) -> list[str]:
    """Called before LoRA adapters are attached, on the claiming plugin only.

    ``mode`` is ``"default"`` (the family's recommended set) or ``"all-linear"``. Return module
    name suffixes as PEFT's ``target_modules`` takes them (e.g. ``["q_proj", "v_proj"]``). The core
    checks that each exists in ``model`` and that the output head is never among them.
    Stops at first non-None result.
    """


@hookspec(firstresult=True)
def famtune_generation_defaults(family: str, tokenizer: Any) -> GenerationDefaults:
    """Called when an adapter's metadata is written and before chat, on the claiming plugin only.

    Return a ``famtune.types.GenerationDefaults``: the stop token ids (every one must exist in
    ``tokenizer``) and the family's sampling defaults (``temperature``, ``top_p``, ...).
    Stops at first non-None result.
    """


@hookspec(firstresult=True)
def famtune_load_tokenizer(family: str, path: str, trust_remote_code: bool) -> Any:
    """Called when a checkpoint's tokenizer is loaded, on the claiming plugin only.

    Return a tokenizer for the checkpoint at ``path``, or ``None`` to let the core use
    ``transformers.AutoTokenizer``. Plugins never run a checkpoint's remote code unless
    ``trust_remote_code`` is true. Stops at first non-None result.
    """


@hookspec(firstresult=True)
def famtune_load_model(family: str, path: str, load_kwargs: dict[str, Any]) -> Any:
    """Called when a checkpoint's weights are loaded, on the claiming plugin only.

    ``load_kwargs`` are the keyword arguments the core would pass to
    ``AutoModelForCausalLM.from_pretrained`` (dtype, quantization_config, device_map,
    trust_remote_code). Return a loaded ``PreTrainedModel`` (e.g. after mapping an original
    layout onto a native transformers class), or ``None`` to let the core load ``path`` itself.
    Stops at first non-None result.
    """


@hookspec(firstresult=True)
def famtune_write_original_layout(family: str, native_dir: str, out_dir: str, original_config: dict[str, Any]) -> bool:
    """Called by ``famtune merge --layout original``, on the claiming plugin only.

    ``native_dir`` holds a merged model in the native transformers layout (config.json and
    safetensors shards); ``original_config`` is the ``config.json`` of the checkpoint the adapter
    was trained on. Write the family's original layout (its config.json with ``auto_map`` and its
    original weight names) to ``out_dir`` and return ``True``; return ``None`` if the family has no
    layout other than the native one. Stops at first non-None result.
    """


@hookspec(firstresult=True)
def famtune_tiny_checkpoint(family: str, out_dir: str, corpus: list[str]) -> bool:
    """Called by ``famtune demo`` and by conformance tests, on the claiming plugin only.

    Write a tiny random-weight checkpoint of ``family`` to ``out_dir`` (config.json, safetensors and
    tokenizer files, in the layout the plugin loads), with a small tokenizer trained on ``corpus``
    (``famtune.tiny.train_tokenizer`` does that), and return ``True``. Return ``None`` if the
    plugin cannot build one. Nothing is downloaded. Stops at first non-None result.
    """


@hookspec(firstresult=True)
def famtune_supports_packing(family: str) -> bool:
    """Called when a run would pack several samples into one row, on the claiming plugin only.

    Return ``True`` if the family's model keeps packed samples apart when given position ids that
    restart at 0 for every sample in a row (attention never crosses a sample boundary and positions
    restart), ``False`` if it cannot; famtune then refuses packing for that family with a clear
    message instead of training on contaminated rows. Stops at first non-None result.
    """
