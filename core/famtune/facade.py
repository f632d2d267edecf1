"""``Family``: one registered family with the plugin that provides it, the core's only view of it.

Every answer the family object gives is validated here, and a wrong one is reported naming the
plugin, its distribution and version (and, for an old-contract plugin, the old hook).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from famtune.encoding import GENERIC_POLICIES, IGNORE_INDEX, EncodedConversation
from famtune.errors import FamtuneError, PluginError
from famtune.family import MaskingPolicy, ModelFamily
from famtune.legacy import LegacyFamily
from famtune.types import GenerationDefaults

if TYPE_CHECKING:
    from famtune.plugins import PluginSet


class Family:
    """One registered family with the plugin that provides it. Every answer is validated here."""

    def __init__(self, plugins: PluginSet, plugin_name: str, name: str) -> None:
        self.plugins = plugins
        self.plugin_name = plugin_name
        self.name = name
        self.info = plugins.infos[plugin_name]
        self.obj: ModelFamily = plugins.registry.families[name][0]
        self._policies: list[str] | None = None  # asked once: encode runs per sample

    def _call(self, what: str, method: str, *args: Any, required: bool = True) -> Any:
        hook = self.obj.hook_name(method) if isinstance(self.obj, LegacyFamily) else what
        try:
            attr = getattr(self.obj, method)
            answer = attr(*args) if callable(attr) else attr  # some answers are plain attributes
        except FamtuneError:
            raise
        except Exception as exc:
            raise PluginError(self.info, hook, f"raised {type(exc).__name__}: {exc}") from exc
        if answer is None and required:
            raise PluginError(self.info, hook, f"gave no answer for family {self.name!r}")
        return answer

    def _bad(self, method: str, why: str) -> PluginError:
        hook = self.obj.hook_name(method) if isinstance(self.obj, LegacyFamily) else f"family {self.name!r} {method}"
        return PluginError(self.info, hook, why)

    def _what(self, method: str) -> str:
        return f"family {self.name!r} {method}"

    # -- templates -----------------------------------------------------------------------------
    def conversation_template(self):
        from fastchat.conversation import Conversation, register_conv_template

        conv = self._call(self._what("conversation"), "conversation")
        if not isinstance(conv, Conversation):
            raise self._bad("conversation", f"returned {type(conv).__name__}, not a fastchat Conversation")
        register_conv_template(conv, override=True)
        return conv

    def chat_template(self) -> str:
        tpl = self._call(self._what("chat_template"), "chat_template")
        if not isinstance(tpl, str) or "{" not in tpl:
            raise self._bad("chat_template", "did not return a Jinja template string")
        return tpl

    def _native_policies(self) -> list[str]:
        if self._policies is None:
            policies = self._call(self._what("masking_policies"), "masking_policies")
            if not isinstance(policies, (list, tuple)) or not all(isinstance(p, str) for p in policies):
                raise self._bad("masking_policies", f"returned {policies!r}, not a list of policy names")
            missing = [p for p in GENERIC_POLICIES if p not in policies]
            if missing:
                raise self._bad("masking_policies", f"does not accept the generic policies {missing}")
            self._policies = list(policies)
        return self._policies

    def _extra_policies(self) -> dict[str, MaskingPolicy]:
        return {
            n: p for n, p in self.plugins.masking_policies().items() if p.families is None or self.name in p.families
        }

    def masking_policies(self) -> list[str]:
        """The family's own policies (its default first), then other plugins' policies that apply to it."""
        native = self._native_policies()
        return native + [n for n in self._extra_policies() if n not in native]

    def encode(
        self, tokenizer: Any, messages: list[dict[str, str]], masking: str, add_generation_prompt: bool = False
    ) -> EncodedConversation:
        what = self._what("encode")
        policy = None
        if masking not in GENERIC_POLICIES and masking not in self._native_policies():
            policy = self._extra_policies().get(masking)
        enc = self._call(
            what, "encode", tokenizer, messages, "all_assistant" if policy else masking, add_generation_prompt
        )
        if not isinstance(enc, EncodedConversation):
            raise self._bad("encode", f"returned {type(enc).__name__}, not an EncodedConversation")
        if policy is not None:
            if enc.turns is None or len(enc.turns) != len(enc.input_ids):
                raise FamtuneError(
                    f"masking {masking!r} needs each token's turn, which {self.info.describe()}'s "
                    f"encoder for {self.name} does not record (it does not use ConversationBuilder)"
                )
            enc = EncodedConversation(enc.input_ids, list(policy.label(enc)), enc.turns)
        if len(enc.labels) != len(enc.input_ids):
            raise self._bad("encode", f"gave {len(enc.input_ids)} ids but {len(enc.labels)} labels")
        if not enc.input_ids:
            raise self._bad("encode", "gave an empty sequence")
        if not add_generation_prompt and enc.num_supervised == 0:
            raise self._bad("encode", f"supervised no token under masking {masking!r}")
        vocab = len(tokenizer)
        bad = [x for x in enc.labels if x != IGNORE_INDEX and not 0 <= x < vocab]
        if bad:
            raise self._bad("encode", f"gave label ids outside the tokenizer: {bad[:5]}")
        return enc

    # -- model ---------------------------------------------------------------------------------
    def lora_target_modules(self, model: Any, mode: str) -> list[str]:
        targets = self._call(self._what("lora_target_modules"), "lora_target_modules", model, mode)
        if not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(t, str) for t in targets):
            raise self._bad("lora_target_modules", f"returned {targets!r}, not a non-empty list of module names")
        return validate_targets(list(targets), model, lambda why: self._bad("lora_target_modules", why))

    def generation_defaults(self, tokenizer: Any) -> GenerationDefaults:
        gen = self._call(self._what("generation_defaults"), "generation_defaults", tokenizer)
        if not isinstance(gen, GenerationDefaults):
            raise self._bad("generation_defaults", f"returned {type(gen).__name__}, not GenerationDefaults")
        if not gen.stop_ids:
            raise self._bad("generation_defaults", "gave no stop ids")
        for sid in gen.stop_ids:
            if not isinstance(sid, int) or not 0 <= sid < len(tokenizer):
                raise self._bad(
                    "generation_defaults", f"stop id {sid!r} is not in the tokenizer (size {len(tokenizer)})"
                )
        return gen

    def load_tokenizer(self, path: str, trust_remote_code: bool) -> Any:
        tok = self._call(self._what("load_tokenizer"), "load_tokenizer", path, trust_remote_code, required=False)
        if tok is not None and not (callable(getattr(tok, "encode", None)) and hasattr(tok, "__len__")):
            raise self._bad("load_tokenizer", f"returned {type(tok).__name__}, not a tokenizer")
        return tok

    def load_model(self, path: str, load_kwargs: dict[str, Any]) -> Any:
        model = self._call(self._what("load_model"), "load_model", path, load_kwargs, required=False)
        if model is not None:
            from transformers import PreTrainedModel

            if not isinstance(model, PreTrainedModel):
                raise self._bad("load_model", f"returned {type(model).__name__}, not a transformers PreTrainedModel")
        return model

    def write_original_layout(self, native_dir: str, out_dir: str, original_config: dict[str, Any]) -> bool:
        done = self._call(
            self._what("write_original_layout"),
            "write_original_layout",
            native_dir,
            out_dir,
            original_config,
            required=False,
        )
        if done is not None and not isinstance(done, bool):
            raise self._bad("write_original_layout", f"returned {done!r}, not True or None")
        return bool(done)

    def supports_packing(self) -> bool:
        answer = self._call(self._what("supports_packing"), "supports_packing", required=False)
        if answer is not None and not isinstance(answer, bool):
            raise self._bad("supports_packing", f"returned {answer!r}, not True or False")
        return bool(answer)

    def tiny_checkpoint(self, out_dir: str, corpus: list[str]) -> bool:
        done = self._call(self._what("tiny_checkpoint"), "tiny_checkpoint", out_dir, corpus, required=False)
        if done is not None and not isinstance(done, bool):
            raise self._bad("tiny_checkpoint", f"returned {done!r}, not True or None")
        return bool(done)

    def describe(self) -> dict[str, str]:
        return {
            "plugin": self.info.name,
            "distribution": self.info.distribution,
            "version": self.info.version,
            "family": self.name,
        }


def validate_targets(targets: list[str], model: Any, bad: Callable[[str], Exception]) -> list[str]:
    """Every target must name existing modules, and none may be the output head."""
    names = [n for n, _ in model.named_modules()]
    head = model.get_output_embeddings()
    head_names = {n for n, m in model.named_modules() if head is not None and m is head}
    for t in targets:
        hits = [n for n in names if n == t or n.endswith("." + t)]
        if not hits:
            raise bad(f"target module {t!r} does not exist in the model")
        if head_names & set(hits):
            raise bad(f"target module {t!r} is the output head; the head is never a LoRA target")
    return list(targets)
