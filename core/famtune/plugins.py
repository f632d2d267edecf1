"""Plugin discovery and the typed facade through which the core calls family plugins.

Plugins are found only through the ``famtune`` entry-point group, built-in ones included.
``FAMTUNE_LOAD_PLUGINS`` is a comma-separated allow-list of entry-point names (the empty string
loads none), so a broken plugin can always be bypassed. A plugin that fails to import or to
validate is set aside and reported; the others keep working.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable

import pluggy

from famtune import hookspecs
from famtune.encoding import GENERIC_POLICIES, IGNORE_INDEX, EncodedConversation
from famtune.errors import FamtuneError, PluginError
from famtune.types import GenerationDefaults, PluginInfo

ENTRY_POINT_GROUP = "famtune"
ALLOW_ENV = "FAMTUNE_LOAD_PLUGINS"


@dataclass
class BrokenPlugin:
    info: PluginInfo
    error: str


class PluginSet:
    """The loaded plugins: a pluggy manager plus where each plugin came from."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("famtune")
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self.broken: list[BrokenPlugin] = []

    # -- loading ---------------------------------------------------------------------------
    def load_entry_points(self) -> None:
        allowed = os.environ.get(ALLOW_ENV)
        allow = None if allowed is None else {n.strip() for n in allowed.split(",") if n.strip()}
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if allow is not None and ep.name not in allow:
                continue
            dist = ep.dist.name if ep.dist else "?"
            version = ep.dist.version if ep.dist else "?"
            info = PluginInfo(ep.name, dist, version)
            if ep.name in self.infos:
                other = self.infos[ep.name]
                raise FamtuneError(
                    f"two plugins are named {ep.name!r}: {other.distribution} {other.version} and {dist} {version}; "
                    "uninstall one of them"
                )
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin must not take famtune down with it
                self.broken.append(BrokenPlugin(info, f"import failed: {type(exc).__name__}: {exc}"))
                continue
            self.register(module, info)
        self._check_pending()
        self._check_families()

    def register(self, module: object, info: PluginInfo) -> None:
        try:
            self.pm.register(module, name=info.name)
        except pluggy.PluginValidationError as exc:
            self.broken.append(BrokenPlugin(info, f"invalid hook: {exc}"))
            return
        self.infos[info.name] = info

    def _check_pending(self) -> None:
        # A hook implementation with no spec (a misspelled hook) would silently never run.
        for name, hook in vars(self.pm.hook).items():
            if not name.startswith("famtune_") or hook.has_spec():
                continue
            for impl in hook.get_hookimpls():
                info = self.infos.get(impl.plugin_name)
                if info is None:
                    continue
                self.broken.append(BrokenPlugin(info, f"unknown hook {name!r} (misspelled?)"))
                self.pm.unregister(name=impl.plugin_name)
                del self.infos[impl.plugin_name]
        self.pm.check_pending()

    def _disable(self, name: str, error: str) -> None:
        self.broken.append(BrokenPlugin(self.infos.pop(name), error))
        self.pm.unregister(name=name)

    def _check_families(self) -> None:
        # Listings and claim errors call famtune_families on every plugin, so a bad answer there
        # would break famtune for everyone; and a family two plugins provide would be decided by
        # load order. Both disable the plugins concerned, naming each.
        owners: dict[str, list[str]] = {}
        for name in list(self.infos):
            try:
                fams = self.call_one("famtune_families", name)
            except Exception as exc:
                self._disable(name, f"famtune_families raised {type(exc).__name__}: {exc}")
                continue
            if not isinstance(fams, (list, tuple)) or not all(isinstance(f, str) and f for f in fams):
                self._disable(name, f"famtune_families returned {fams!r}, not a list of family names")
                continue
            for fam in fams:
                owners.setdefault(fam, []).append(name)
        clashes = {fam: names for fam, names in owners.items() if len(names) > 1}
        for name in sorted({n for names in clashes.values() for n in names}):
            fams = [f for f, names in clashes.items() if name in names]
            others = sorted({self.infos[o].describe() for f in fams for o in clashes[f] if o != name})
            self.broken.append(BrokenPlugin(self.infos[name], (
                f"family {', '.join(map(repr, fams))} is also provided by {', '.join(others)}; "
                f"uninstall one, or choose one with {ALLOW_ENV}=name,...")))
        for name in sorted({n for names in clashes.values() for n in names}):
            del self.infos[name]
            self.pm.unregister(name=name)

    # -- queries -----------------------------------------------------------------------------
    def impl(self, hook_name: str, plugin_name: str) -> Callable[..., Any] | None:
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            if impl.plugin_name == plugin_name:
                return impl.function
        return None

    def call_one(self, hook_name: str, plugin_name: str, **kwargs: Any) -> Any:
        fn = self.impl(hook_name, plugin_name)
        if fn is None:
            return None
        argnames = fn.__code__.co_varnames[: fn.__code__.co_argcount]
        return fn(**{k: v for k, v in kwargs.items() if k in argnames})

    def hooks_of(self, plugin_name: str) -> list[str]:
        plugin = self.pm.get_plugin(plugin_name)
        return sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])

    def families_of(self, plugin_name: str) -> list[str]:
        return list(self.call_one("famtune_families", plugin_name) or [])

    def describe_installed(self) -> str:
        if not self.infos:
            return "none"
        parts = []
        for name, info in self.infos.items():
            fams = ", ".join(self.families_of(name)) or "no families"
            parts.append(f"{name} ({info.distribution} {info.version}: {fams})")
        return "; ".join(parts)

    # -- the claim ---------------------------------------------------------------------------
    def claim(self, config: dict[str, Any], path: str, family: str | None = None) -> "Family":
        """The one plugin that handles this checkpoint, or an error naming every candidate.

        ``family`` forces a family name (a recipe's ``family:`` key) instead of the claim.
        """
        if family is not None:
            owners = [n for n in self.infos if family in self.families_of(n)]
            if len(owners) != 1:
                what = "no installed plugin provides" if not owners else "several plugins provide"
                raise FamtuneError(
                    f"{what} family {family!r}; installed: {self.describe_installed()}"
                )
            return Family(self, owners[0], family)
        claims: list[tuple[str, str]] = []
        failed: list[str] = []
        for name in self.infos:
            # One plugin's faulty claim must not stop the others from claiming their checkpoints.
            try:
                answer = self.call_one("famtune_claim_checkpoint", name, config=config, path=path)
            except Exception as exc:
                failed.append(str(PluginError(self.infos[name], "famtune_claim_checkpoint",
                                              f"raised {type(exc).__name__}: {exc}")))
                continue
            if answer is None:
                continue
            if not isinstance(answer, str) or answer not in self.families_of(name):
                failed.append(str(PluginError(self.infos[name], "famtune_claim_checkpoint",
                                              f"returned {answer!r}, not one of its family names")))
                continue
            claims.append((name, answer))
        for problem in failed:
            print(f"famtune: warning: {problem}; ignoring its claim", file=sys.stderr)
        model_type = config.get("model_type", "?")
        if not claims:
            raise FamtuneError(
                f"no installed plugin claims model_type {model_type} ({path}); installed: {self.describe_installed()}; "
                + (f"failed: {'; '.join(failed)}; " if failed else "")
                + "install the family's plugin (pip install famtune-<family>)"
            )
        if len(claims) > 1:
            who = ", ".join(f"{self.infos[n].describe()} as {f!r}" for n, f in claims)
            raise FamtuneError(
                f"several plugins claim model_type {model_type} ({path}): {who}; "
                f"disable all but one with {ALLOW_ENV}=name,..."
            )
        return Family(self, *claims[0])


_PLUGINS: PluginSet | None = None


def get_plugins() -> PluginSet:
    """The process-wide plugin set, loaded from entry points on first use."""
    global _PLUGINS
    if _PLUGINS is None:
        plugins = PluginSet()
        plugins.load_entry_points()
        for b in plugins.broken:
            print(f"famtune: warning: {b.info.describe()} is disabled: {b.error}", file=sys.stderr)
        _PLUGINS = plugins
    return _PLUGINS


class Family:
    """The claiming plugin, bound to one family. Every answer is validated here."""

    def __init__(self, plugins: PluginSet, plugin_name: str, name: str) -> None:
        self.plugins = plugins
        self.plugin_name = plugin_name
        self.name = name
        self.info = plugins.infos[plugin_name]

    def _call(self, hook: str, required: bool = True, **kwargs: Any) -> Any:
        try:
            answer = self.plugins.call_one(hook, self.plugin_name, family=self.name, **kwargs)
        except FamtuneError:
            raise
        except Exception as exc:
            raise PluginError(self.info, hook, f"raised {type(exc).__name__}: {exc}") from exc
        if answer is None and required:
            raise PluginError(self.info, hook, f"gave no answer for family {self.name!r}")
        return answer

    def _bad(self, hook: str, why: str) -> PluginError:
        return PluginError(self.info, hook, why)

    # -- templates -----------------------------------------------------------------------------
    def conversation_template(self):
        from fastchat.conversation import Conversation, register_conv_template

        conv = self._call("famtune_conversation_template")
        if not isinstance(conv, Conversation):
            raise self._bad("famtune_conversation_template", f"returned {type(conv).__name__}, not a fastchat Conversation")
        register_conv_template(conv, override=True)
        return conv

    def chat_template(self) -> str:
        tpl = self._call("famtune_chat_template")
        if not isinstance(tpl, str) or "{" not in tpl:
            raise self._bad("famtune_chat_template", "did not return a Jinja template string")
        return tpl

    def masking_policies(self) -> list[str]:
        policies = self._call("famtune_masking_policies")
        if not isinstance(policies, (list, tuple)) or not all(isinstance(p, str) for p in policies):
            raise self._bad("famtune_masking_policies", f"returned {policies!r}, not a list of policy names")
        missing = [p for p in GENERIC_POLICIES if p not in policies]
        if missing:
            raise self._bad("famtune_masking_policies", f"does not accept the generic policies {missing}")
        return list(policies)

    def encode(self, tokenizer: Any, messages: list[dict[str, str]], masking: str,
               add_generation_prompt: bool = False) -> EncodedConversation:
        hook = "famtune_encode_conversation"
        enc = self._call(hook, tokenizer=tokenizer, messages=messages, masking=masking,
                         add_generation_prompt=add_generation_prompt)
        if not isinstance(enc, EncodedConversation):
            raise self._bad(hook, f"returned {type(enc).__name__}, not an EncodedConversation")
        if len(enc.labels) != len(enc.input_ids):
            raise self._bad(hook, f"gave {len(enc.input_ids)} ids but {len(enc.labels)} labels")
        if not enc.input_ids:
            raise self._bad(hook, "gave an empty sequence")
        if not add_generation_prompt and enc.num_supervised == 0:
            raise self._bad(hook, f"supervised no token under masking {masking!r}")
        vocab = len(tokenizer)
        bad = [x for x in enc.labels if x != IGNORE_INDEX and not 0 <= x < vocab]
        if bad:
            raise self._bad(hook, f"gave label ids outside the tokenizer: {bad[:5]}")
        return enc

    # -- model ---------------------------------------------------------------------------------
    def lora_target_modules(self, model: Any, mode: str) -> list[str]:
        hook = "famtune_lora_target_modules"
        targets = self._call(hook, model=model, mode=mode)
        if not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(t, str) for t in targets):
            raise self._bad(hook, f"returned {targets!r}, not a non-empty list of module names")
        return validate_targets(targets, model, lambda why: self._bad(hook, why))

    def generation_defaults(self, tokenizer: Any) -> GenerationDefaults:
        hook = "famtune_generation_defaults"
        gen = self._call(hook, tokenizer=tokenizer)
        if not isinstance(gen, GenerationDefaults):
            raise self._bad(hook, f"returned {type(gen).__name__}, not GenerationDefaults")
        if not gen.stop_ids:
            raise self._bad(hook, "gave no stop ids")
        for sid in gen.stop_ids:
            if not isinstance(sid, int) or not 0 <= sid < len(tokenizer):
                raise self._bad(hook, f"stop id {sid!r} is not in the tokenizer (size {len(tokenizer)})")
        return gen

    def load_tokenizer(self, path: str, trust_remote_code: bool) -> Any:
        tok = self._call("famtune_load_tokenizer", required=False, path=path, trust_remote_code=trust_remote_code)
        if tok is not None and not (callable(getattr(tok, "encode", None)) and hasattr(tok, "__len__")):
            raise self._bad("famtune_load_tokenizer", f"returned {type(tok).__name__}, not a tokenizer")
        return tok

    def load_model(self, path: str, load_kwargs: dict[str, Any]) -> Any:
        model = self._call("famtune_load_model", required=False, path=path, load_kwargs=load_kwargs)
        if model is not None:
            from transformers import PreTrainedModel

            if not isinstance(model, PreTrainedModel):
                raise self._bad("famtune_load_model", f"returned {type(model).__name__}, not a transformers PreTrainedModel")
        return model

    def write_original_layout(self, native_dir: str, out_dir: str, original_config: dict[str, Any]) -> bool:
        done = self._call("famtune_write_original_layout", required=False, native_dir=native_dir,
                          out_dir=out_dir, original_config=original_config)
        if done is not None and not isinstance(done, bool):
            raise self._bad("famtune_write_original_layout", f"returned {done!r}, not True or None")
        return bool(done)

    def supports_packing(self) -> bool:
        answer = self._call("famtune_supports_packing", required=False)
        if answer is not None and not isinstance(answer, bool):
            raise self._bad("famtune_supports_packing", f"returned {answer!r}, not True or False")
        return bool(answer)

    def tiny_checkpoint(self, out_dir: str, corpus: list[str]) -> bool:
        done = self._call("famtune_tiny_checkpoint", required=False, out_dir=out_dir, corpus=corpus)
        if done is not None and not isinstance(done, bool):
            raise self._bad("famtune_tiny_checkpoint", f"returned {done!r}, not True or None")
        return bool(done)

    def describe(self) -> dict[str, str]:
        return {"plugin": self.info.name, "distribution": self.info.distribution,
                "version": self.info.version, "family": self.name}


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
