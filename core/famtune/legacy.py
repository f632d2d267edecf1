"""Old-contract plugins (``famtune.hookspecs_v1``) seen as ``ModelFamily`` objects, for one release.

A plugin that implements ``famtune_families`` and the per-operation hooks gets one
``LegacyFamily`` per family name it lists; each method calls the matching old hook on that plugin
alone through pluggy (which passes only the arguments the implementation names). Loading such a
plugin prints a deprecation warning naming the hooks to replace.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from famtune import hookspecs_v1
from famtune.family import ModelFamily

if TYPE_CHECKING:
    from famtune.plugins import PluginSet

LEGACY_HOOKS = frozenset(n for n, f in vars(hookspecs_v1).items() if n.startswith("famtune_") and inspect.isfunction(f))

# ModelFamily member -> the old hook answering it.
_HOOK_OF = {
    "conversation": "famtune_conversation_template",
    "chat_template": "famtune_chat_template",
    "masking_policies": "famtune_masking_policies",
    "encode": "famtune_encode_conversation",
    "lora_target_modules": "famtune_lora_target_modules",
    "generation_defaults": "famtune_generation_defaults",
    "load_tokenizer": "famtune_load_tokenizer",
    "load_model": "famtune_load_model",
    "write_original_layout": "famtune_write_original_layout",
    "tiny_checkpoint": "famtune_tiny_checkpoint",
    "supports_packing": "famtune_supports_packing",
}


class LegacyFamily(ModelFamily):
    """One family of an old-contract plugin."""

    def __init__(self, plugins: PluginSet, plugin_name: str, name: str) -> None:
        self.plugins = plugins
        self.plugin_name = plugin_name
        self.name = name

    @staticmethod
    def hook_name(member: str) -> str:
        return _HOOK_OF.get(member, member)

    def _ask(self, hook: str, **kwargs: Any) -> Any:
        return self.plugins.call_legacy(hook, self.plugin_name, family=self.name, **kwargs)

    def claimed_name(self, config: dict[str, Any], path: str) -> str | None:
        """The plugin's own claim (old plugins claim for all their families at once, marker included)."""
        answers = self.plugins.call_legacy("famtune_claim_checkpoint", self.plugin_name, config=config, path=path)
        return answers[0] if answers else None

    def claims(self, config: dict[str, Any], path: str) -> bool:
        return self.claimed_name(config, path) == self.name

    def conversation(self):
        return self._ask("famtune_conversation_template")

    def chat_template(self) -> str:
        return self._ask("famtune_chat_template")

    @property
    def masking_policies(self):  # type: ignore[override]
        return self._ask("famtune_masking_policies")

    @property
    def supports_packing(self):  # type: ignore[override]
        return self._ask("famtune_supports_packing")

    def encode(self, tokenizer, messages, masking, add_generation_prompt):
        return self._ask(
            "famtune_encode_conversation",
            tokenizer=tokenizer,
            messages=messages,
            masking=masking,
            add_generation_prompt=add_generation_prompt,
        )

    def lora_target_modules(self, model, mode):
        return self._ask("famtune_lora_target_modules", model=model, mode=mode)

    def generation_defaults(self, tokenizer):
        return self._ask("famtune_generation_defaults", tokenizer=tokenizer)

    def load_tokenizer(self, path, trust_remote_code):
        return self._ask("famtune_load_tokenizer", path=path, trust_remote_code=trust_remote_code)

    def load_model(self, path, load_kwargs):
        return self._ask("famtune_load_model", path=path, load_kwargs=load_kwargs)

    def write_original_layout(self, native_dir, out_dir, original_config):
        return self._ask(
            "famtune_write_original_layout", native_dir=native_dir, out_dir=out_dir, original_config=original_config
        )

    def tiny_checkpoint(self, out_dir, corpus):
        return self._ask("famtune_tiny_checkpoint", out_dir=out_dir, corpus=corpus)
