"""Plugin discovery and the typed facade over ``pm.hook`` (``Family``, the validated view of one
family, is in ``famtune.facade`` and re-exported here).

Plugins are found only through the ``famtune`` entry-point group, built-in ones included;
famtune's own defaults (``famtune.builtins``) are registered first as an ordinary ``trylast``
plugin. ``FAMTUNE_LOAD_PLUGINS`` is a comma-separated allow-list of entry-point names (the empty
string loads none), so a broken plugin can always be bypassed. A plugin that fails to import or
to validate is set aside and reported; the others keep working.

Every hook call goes through one typed method of ``PluginSet`` (``resolve_model_source``,
``training_callbacks``, ``add_commands``, ...), which calls ``pm.hook.famtune_*``; the rest of
famtune never calls ``pm.hook`` itself. Registrar hooks are called per plugin (pluggy's
``subset_hook_caller``) so every registered object is attributed to its plugin in errors.
"""

from __future__ import annotations

import os
import sys
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy

from famtune import builtins as builtin_plugin
from famtune import hookspecs, hookspecs_v1
from famtune.errors import FamtuneError, PluginError
from famtune.facade import Family, validate_targets
from famtune.family import MARKER_KEY, DataFormat, MaskingPolicy, ModelFamily, Registry
from famtune.legacy import LEGACY_HOOKS, LegacyFamily
from famtune.types import PluginInfo

__all__ = ["ALLOW_ENV", "ENTRY_POINT_GROUP", "BrokenPlugin", "Family", "PluginSet", "get_plugins", "validate_targets"]

ENTRY_POINT_GROUP = "famtune"
ALLOW_ENV = "FAMTUNE_LOAD_PLUGINS"
_SINGULAR = {"families": "family", "masking_policies": "masking policy", "data_formats": "data format"}
BUILTIN = PluginInfo("famtune.builtins", "famtune", __import__("famtune").__version__)


@dataclass
class BrokenPlugin:
    info: PluginInfo
    error: str


class PluginSet:
    """The loaded plugins: a pluggy manager, where each plugin came from, and what it registered."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("famtune")
        self.pm.add_hookspecs(hookspecs)
        self.pm.add_hookspecs(hookspecs_v1)
        self.infos: dict[str, PluginInfo] = {}
        self.broken: list[BrokenPlugin] = []
        #: Per plugin, the deprecation it triggered (old-contract hooks), for listings and warnings.
        self.deprecated: dict[str, str] = {}
        self.registry = Registry()
        self._subsets: dict[tuple[str, str], Any] = {}
        self.pm.register(builtin_plugin, name=BUILTIN.name)

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

    def register(self, module: object, info: PluginInfo) -> None:
        try:
            hash(module)
        except TypeError:  # pluggy's per-plugin calls keep plugins in sets; a namespace becomes a module
            namespace, module = module, types.ModuleType(info.name)
            vars(module).update(vars(namespace))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                self.pm.register(module, name=info.name)
            except pluggy.PluginValidationError as exc:
                self.broken.append(BrokenPlugin(info, f"invalid hook: {exc}"))
                return
        self.infos[info.name] = info
        old = sorted(h for h in self.hooks_of(info.name) if h in LEGACY_HOOKS)
        if old or any(isinstance(w.message, hookspecs_v1.FamtuneDeprecationWarning) for w in caught):
            self.deprecated[info.name] = (
                f"{info.describe()} uses famtune's old plugin contract ({', '.join(old)}), which goes away in the "
                "next release; register a famtune.family.ModelFamily from famtune_register_families "
                "(docs/authors/migrating.md)"
            )

    def _check_pending(self) -> None:
        """After loading: an unknown hook (a misspelling) disables its plugin; then collect registrations."""
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
        self._collect()

    def _disable(self, name: str, error: str) -> None:
        self.broken.append(BrokenPlugin(self.infos.pop(name), error))
        self.pm.unregister(name=name)
        self.deprecated.pop(name, None)
        self._subsets.clear()

    def _only(self, hook_name: str, plugin_name: str):
        """``pm.hook.<hook_name>`` restricted to one plugin (pluggy semantics kept), to attribute answers."""
        key = (hook_name, plugin_name)
        if key not in self._subsets:  # old-contract hooks run per sample: build each caller once
            others = [p for n, p in self.pm.list_name_plugin() if n != plugin_name]
            self._subsets[key] = self.pm.subset_hook_caller(hook_name, remove_plugins=others)
        return self._subsets[key]

    def _registered(self, hook_name: str, plugin_name: str, kind: type) -> list[Any]:
        got: list[Any] = []

        def register(obj: Any) -> None:
            if not isinstance(obj, kind):
                raise TypeError(f"registered {type(obj).__name__}, not a {kind.__module__}.{kind.__name__}")
            if not isinstance(getattr(obj, "name", None), str) or not getattr(obj, "name"):  # noqa: B009
                raise TypeError(f"registered a {kind.__name__} without a name")
            got.append(obj)

        self._only(hook_name, plugin_name)(register=register)
        return got

    def _collect(self) -> None:
        """Ask every plugin what it registers; a plugin whose registration fails or clashes is disabled."""
        self.registry = Registry()
        self._subsets.clear()
        regs: dict[str, dict[str, list[Any]]] = {}
        for name in [BUILTIN.name, *self.infos]:
            try:
                regs[name] = {
                    "families": self._families_registered(name),
                    "masking_policies": self._registered("famtune_register_masking_policies", name, MaskingPolicy),
                    "data_formats": self._registered("famtune_register_data_formats", name, DataFormat),
                }
            except Exception as exc:
                if name == BUILTIN.name:
                    raise
                self._disable(name, f"registration failed: {type(exc).__name__}: {exc}")
        # The same name from two plugins would be decided by load order: both are disabled, each
        # error naming the other. famtune's built-ins are defaults any plugin may replace.
        clashing: dict[str, list[str]] = {}
        partners: dict[str, set[str]] = {}
        for kind in ("families", "masking_policies", "data_formats"):
            owners: dict[str, list[str]] = {}
            for name, reg in regs.items():
                for obj in reg[kind]:
                    owners.setdefault(obj.name, []).append(name)
            for obj_name, names in owners.items():
                plugins = [n for n in dict.fromkeys(names) if n != BUILTIN.name]
                if len(plugins) > 1 or len(names) > len(set(names)):
                    for n in plugins:
                        clashing.setdefault(n, []).append(f"{_SINGULAR[kind]} {obj_name!r}")
                        partners.setdefault(n, set()).update(p for p in plugins if p != n)
        described = {n: self.infos[n].describe() for n in clashing}
        for name, what in clashing.items():
            others = sorted(described[o] for o in partners[name])
            self._disable(
                name,
                f"{', '.join(what)} is also provided by {', '.join(others) or 'itself twice'}; "
                f"uninstall one, or choose one with {ALLOW_ENV}=name,...",
            )
        for name in [BUILTIN.name, *self.infos]:
            for kind in ("families", "masking_policies", "data_formats"):
                table = getattr(self.registry, kind)
                for obj in regs.get(name, {}).get(kind, []):
                    # A plugin's object replaces a built-in of the same name (built-ins are trylast defaults).
                    table[obj.name] = (obj, name)

    def _families_registered(self, name: str) -> list[ModelFamily]:
        if name == BUILTIN.name:
            return []
        fams = self._registered("famtune_register_families", name, ModelFamily)
        if name in self.deprecated and self.impl("famtune_families", name) is not None:
            answer = self._only("famtune_families", name)()
            names = answer[0] if answer else None
            if not isinstance(names, (list, tuple)) or not all(isinstance(f, str) and f for f in names):
                raise TypeError(f"famtune_families returned {names!r}, not a list of family names")
            fams += [LegacyFamily(self, name, f) for f in names]
        return fams

    # -- the typed facade: every hook call of famtune ---------------------------------------------
    def impl(self, hook_name: str, plugin_name: str) -> Callable[..., Any] | None:
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            if impl.plugin_name == plugin_name:
                return impl.function
        return None

    def call_legacy(self, hook_name: str, plugin_name: str, **kwargs: Any) -> Any:
        """An old-contract hook of one plugin through pluggy (it passes only the arguments the impl names)."""
        if self.impl(hook_name, plugin_name) is None:
            return None
        answer = self._only(hook_name, plugin_name)(**kwargs)
        return answer

    def masking_policies(self) -> dict[str, MaskingPolicy]:
        return {n: obj for n, (obj, _) in self.registry.masking_policies.items()}

    def data_formats(self) -> dict[str, DataFormat]:
        return {n: obj for n, (obj, _) in self.registry.data_formats.items()}

    def call_one(self, hook_name: str, plugin_name: str, **kwargs: Any) -> Any:
        """One plugin's answer to a hook every plugin answers (``famtune_recipe_dirs``), through pluggy."""
        if self.impl(hook_name, plugin_name) is None:
            return None
        answers = self._only(hook_name, plugin_name)(**kwargs)
        spec = getattr(self.pm.hook, hook_name).spec
        if spec is not None and spec.opts.get("firstresult"):
            return answers
        return answers[0] if answers else None

    def add_commands(self, subparsers: Any) -> None:
        self.pm.hook.famtune_register_commands(subparsers=subparsers)

    def training_callbacks(self, recipe: Any) -> list[Any]:
        out: list[Any] = []
        for answer in self.pm.hook.famtune_training_callbacks(recipe=recipe):
            if not isinstance(answer, (list, tuple)):
                raise FamtuneError(f"famtune_training_callbacks returned {answer!r}, not a list of callbacks")
            out += answer
        return out

    def resolve_model_source(self, spec: str) -> str:
        path = self.pm.hook.famtune_resolve_model_source(spec=spec)
        # famtune's own resolver answers last and raises for what nobody can resolve.
        if not isinstance(path, str) or not os.path.isdir(path):
            raise FamtuneError(f"{spec}: a model-source plugin resolved it to {path!r}, not a directory")
        return path

    # -- listings ------------------------------------------------------------------------------
    def hooks_of(self, plugin_name: str) -> list[str]:
        plugin = self.pm.get_plugin(plugin_name)
        return sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])

    def families_of(self, plugin_name: str) -> list[str]:
        return [n for n, (_, owner) in self.registry.families.items() if owner == plugin_name]

    def extensions_of(self, plugin_name: str) -> dict[str, list[str]]:
        """The masking policies and data formats ``plugin_name`` registered, for listings."""
        return {
            kind: [n for n, (_, owner) in getattr(self.registry, kind).items() if owner == plugin_name]
            for kind in ("masking_policies", "data_formats")
        }

    def describe_installed(self) -> str:
        if not self.infos:
            return "none"
        parts = []
        for name, info in self.infos.items():
            fams = ", ".join(self.families_of(name)) or "no families"
            parts.append(f"{name} ({info.distribution} {info.version}: {fams})")
        return "; ".join(parts)

    # -- the claim ---------------------------------------------------------------------------
    def claim(self, config: dict[str, Any], path: str, family: str | None = None) -> Family:
        """The one family that handles this checkpoint, or an error naming every candidate.

        ``family`` forces a family name (a recipe's ``family:`` key) instead of the claim. A
        checkpoint famtune built or converted carries the family marker and is claimed by that family.
        """
        if family is not None:
            if family not in self.registry.families:
                raise FamtuneError(
                    f"no installed plugin provides family {family!r}; installed: {self.describe_installed()}"
                )
            return Family(self, self.registry.families[family][1], family)
        marked = config.get(MARKER_KEY)
        claims: list[tuple[str, str]] = []
        failed: list[str] = []
        legacy_asked: set[str] = set()
        for fam_name, (obj, owner) in self.registry.families.items():
            if isinstance(obj, LegacyFamily):
                if owner in legacy_asked:
                    continue
                legacy_asked.add(owner)
            # One plugin's faulty claim must not stop the others from claiming their checkpoints.
            try:
                answer = (
                    obj.claimed_name(config, path)
                    if isinstance(obj, LegacyFamily)
                    else (
                        (fam_name if marked == fam_name else None)
                        if marked is not None
                        else (fam_name if obj.claims(config, path) else None)
                    )
                )
            except Exception as exc:
                failed.append(
                    str(PluginError(self.infos[owner], _claim_hook(obj), f"raised {type(exc).__name__}: {exc}"))
                )
                continue
            if answer is None:
                continue
            if not isinstance(answer, str) or answer not in self.families_of(owner):
                failed.append(
                    str(
                        PluginError(
                            self.infos[owner], _claim_hook(obj), f"returned {answer!r}, not one of its family names"
                        )
                    )
                )
                continue
            claims.append((owner, answer))
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


def _claim_hook(obj: ModelFamily) -> str:
    return "famtune_claim_checkpoint" if isinstance(obj, LegacyFamily) else f"family {obj.name!r} claims()"


_PLUGINS: PluginSet | None = None


def get_plugins() -> PluginSet:
    """The process-wide plugin set, loaded from entry points on first use."""
    global _PLUGINS
    if _PLUGINS is None:
        plugins = PluginSet()
        plugins.load_entry_points()
        for b in plugins.broken:
            print(f"famtune: warning: {b.info.describe()} is disabled: {b.error}", file=sys.stderr)
        for message in plugins.deprecated.values():
            print(f"famtune: warning: {message}", file=sys.stderr)
        _PLUGINS = plugins
    return _PLUGINS
