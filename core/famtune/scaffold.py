"""``famtune plugin new NAME``: write a ready-to-install family plugin package.

The package is generated from the files of famtune's example plugin (``examples/famtune-llama3``,
shipped inside famtune as ``famtune/example_plugin``), renamed to the new family: the same
``plugin.py``, ``family.py``, ``template.py``, ``tiny.py`` and ``tests/`` every family plugin has.
It installs, is discovered and passes ``famtune plugins check`` before its author changes a line;
its author then replaces the chat format, the claim and the tiny model with the real family's.
There is no second copy of the plugin to keep in step: the example is the template.
"""

from __future__ import annotations

import re
from pathlib import Path

from famtune.errors import FamtuneError

NAME_RE = re.compile(r"[a-z][a-z0-9]*(?:[-.][a-z0-9]+)*")
EXAMPLE = Path(__file__).resolve().parent / "example_plugin"
EXAMPLE_NAME = "llama3"
#: Files of the example that are written, by their path in the example.
EXAMPLE_FILES = (
    "pyproject.toml",
    "famtune_llama3/__init__.py",
    "famtune_llama3/plugin.py",
    "famtune_llama3/family.py",
    "famtune_llama3/template.py",
    "famtune_llama3/tiny.py",
    "tests/test_llama3.py",
)

README = """\
# {dist}

A [famtune](https://github.com/) family plugin for the `{name}` family, written by
`famtune plugin new {name}` from famtune's example plugin (Llama-3 Instruct on the native Llama
architecture), so it already installs and passes famtune's conformance suite:

    pip install -e .
    famtune plugins            # lists {name}
    famtune plugins check {name}
    pytest tests

Now make it your family's, one file at a time, re-running `famtune plugins check {name}`:

- `{module}/template.py`: the chat format (`ChatFormat`: text around each role's content, stop tokens);
- `{module}/family.py`: `claims()` (which checkpoints are yours), LoRA targets, sampling defaults,
  packing, and loaders if your checkpoints need converting (`famtune.convert`);
- `{module}/tiny.py`: the tiny random-weight model the conformance suite trains;
- `{module}/plugin.py`: registration only.

famtune's docs/authors/hooks.md describes every member and hook.
"""


def _renames(name: str) -> list[tuple[str, str]]:
    module = "famtune_" + re.sub(r"[-.]", "_", name)
    words = re.split(r"[-.]", name)
    camel = "".join(w[:1].upper() + w[1:] for w in words)
    # Longest first, so "famtune-llama3" is renamed as a whole before "llama3" alone.
    return [
        ("famtune-llama3", f"famtune-{name}"),
        ("famtune_llama3", module),
        ("test_llama3", "test_plugin"),
        ("Llama3", camel),
        ("LLAMA3", module.removeprefix("famtune_").upper()),
        (EXAMPLE_NAME, name),
    ]


def _rename(text: str, renames: list[tuple[str, str]]) -> str:
    for old, new in renames:
        text = text.replace(old, new)
    return text


def new_plugin(name: str, parent: str | None = None) -> Path:
    """Write ``famtune-NAME`` under ``parent`` (default: the current directory); return its path."""
    if not NAME_RE.fullmatch(name):
        raise FamtuneError(
            f"plugin name {name!r} is not usable; use lowercase letters, digits, '-' or '.', "
            "starting with a letter, e.g. acme or acme-7b"
        )
    if not all((EXAMPLE / f).is_file() for f in EXAMPLE_FILES):
        raise FamtuneError(f"famtune's example plugin is missing from {EXAMPLE}; reinstall famtune")
    renames = _renames(name)
    out = Path(parent or ".") / f"famtune-{name}"
    if out.exists() and any(out.iterdir()):
        raise FamtuneError(f"{out} already exists and is not empty; choose another --dir or remove it")
    for rel in EXAMPLE_FILES:
        path = out / _rename(rel, renames)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_rename((EXAMPLE / rel).read_text(encoding="utf-8"), renames), encoding="utf-8")
    module = _rename("famtune_llama3", renames)
    (out / "README.md").write_text(README.format(dist=f"famtune-{name}", name=name, module=module), encoding="utf-8")
    return out.resolve()
