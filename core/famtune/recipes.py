"""Built-in recipes: the ready-made recipes family plugins ship, listed and copied out for editing.

A plugin answers ``famtune_recipe_dirs`` with directories of ``NAME.yaml`` files (its package
data). A recipe's first comment line is its description; data files it names by a relative path
(``data: data/identity.jsonl``) live beside it and are copied with it, so a copied recipe runs
as is. The core never names a family here: what a family ships is the plugin's business.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from famtune.errors import FamtuneError

RECIPE_HOOK = "famtune_recipe_dirs"
# Org/Name on the Hugging Face hub, or modelscope:Org/Name; the same syntax famtune.checkpoint resolves.
_HUB_ID = re.compile(r"^(modelscope:)?[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_DATA_KEYS = ("data", "eval_data")


@dataclass(frozen=True)
class BuiltinRecipe:
    name: str
    path: Path
    plugin: str
    description: str

    def data_files(self) -> list[Path]:
        """The bundled files this recipe names by a relative path (they are copied with it)."""
        import yaml

        raw = yaml.safe_load(self.path.read_text(encoding="utf-8")) or {}
        out = []
        for key in _DATA_KEYS:
            value = raw.get(key)
            if isinstance(value, str) and value and not Path(value).is_absolute():
                out.append(Path(value))
        return out


def is_model_source(spec: str) -> bool:
    """Whether ``spec`` is a hub id a built-in recipe may name (``Org/Name`` or ``modelscope:Org/Name``)."""
    return bool(_HUB_ID.match(spec))


def _description(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def builtin_recipes(plugins=None) -> dict[str, BuiltinRecipe]:
    """Every built-in recipe of the loaded plugins, by name; a name shipped twice is an error naming both."""
    from famtune.plugins import get_plugins

    plugins = plugins or get_plugins()
    found: dict[str, BuiltinRecipe] = {}
    for plugin_name, info in plugins.infos.items():
        dirs = plugins.call_one(RECIPE_HOOK, plugin_name) or []
        if not isinstance(dirs, (list, tuple)) or not all(isinstance(d, str) for d in dirs):
            raise FamtuneError(f"{info.describe()}: {RECIPE_HOOK} returned {dirs!r}, not a list of directories")
        for d in dirs:
            if not Path(d).is_dir():
                raise FamtuneError(
                    f"{info.describe()}: {RECIPE_HOOK} names {d}, which is not a directory; reinstall the plugin"
                )
            for path in sorted(Path(d).glob("*.yaml")):
                name = path.stem
                if name in found:
                    other = plugins.infos[found[name].plugin].describe()
                    raise FamtuneError(
                        f"built-in recipe {name!r} is shipped by both {other} and {info.describe()}; "
                        "uninstall one of them"
                    )
                found[name] = BuiltinRecipe(name, path, plugin_name, _description(path))
    return dict(sorted(found.items()))


def list_recipes(pattern: str | None = None) -> list[BuiltinRecipe]:
    """Built-in recipes whose name matches ``pattern`` (a glob, or a plain substring)."""
    recipes = list(builtin_recipes().values())
    if not pattern:
        return recipes
    glob = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
    return [r for r in recipes if fnmatch.fnmatch(r.name.lower(), glob.lower())]


def copy_recipe(name: str, dest: str | None = None) -> Path:
    """Copy recipe ``name`` (and its bundled data) to ``dest``: a ``.yaml`` file path, or a directory
    (default: the current one) that receives ``NAME.yaml``. Never overwrites a file."""
    import difflib

    recipes = builtin_recipes()
    if name not in recipes:
        close = difflib.get_close_matches(name, list(recipes), n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise FamtuneError(f"no built-in recipe named {name!r}; {hint}`famtune recipes list` shows them all")
    recipe = recipes[name]
    target = Path(dest or ".")
    out = target if target.suffix in (".yaml", ".yml") else target / f"{name}.yaml"
    copies = [(recipe.path, out)]
    for rel in recipe.data_files():
        src = recipe.path.parent / rel
        if not src.is_file():
            raise FamtuneError(f"{recipe.path}: names data file {rel}, which the plugin does not ship; reinstall it")
        copies.append((src, out.parent / rel))
    existing = [str(dst) for _, dst in copies if dst.exists()]
    if existing:
        raise FamtuneError(f"{', '.join(existing)} already exists; choose another destination or remove it")
    for src, dst in copies:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return out
