"""docs/: the hook reference matches the hookspecs exactly; the user and author docs stay apart."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from famtune import hookspecs

DOCS = Path(__file__).resolve().parents[1] / "docs"
REFERENCE = DOCS / "authors" / "hooks.md"
SPECS = {n: f for n, f in vars(hookspecs).items() if n.startswith("famtune_") and inspect.isfunction(f)}


def _sections() -> dict[str, str]:
    """``## `famtune_x` `` heading -> the text up to the next ``## `` heading."""
    parts = re.split(r"^## ", REFERENCE.read_text(encoding="utf-8"), flags=re.MULTILINE)
    out = {}
    for part in parts[1:]:
        m = re.match(r"`(famtune_\w+)`\n", part)
        if m:
            assert m.group(1) not in out, f"{m.group(1)} is documented twice"
            out[m.group(1)] = part
    return out


def _norm(annotation: str | None) -> str | None:
    return None if annotation is None else ast.unparse(ast.parse(annotation, mode="eval"))


def _documented_signature(name: str, section: str) -> tuple[list[tuple[str, str | None]], str | None]:
    m = re.search(r"```python\n(def " + name + r"\(.*?)\n```", section, flags=re.DOTALL)
    assert m, f"the reference section of {name} has no ```python def {name}(...)``` block"
    fn = ast.parse(m.group(1).rstrip().rstrip(":") + ": ...").body[0]
    assert isinstance(fn, ast.FunctionDef) and not fn.args.defaults and not fn.args.kwonlyargs
    params = [(a.arg, _norm(ast.unparse(a.annotation)) if a.annotation else None) for a in fn.args.args]
    return params, _norm(ast.unparse(fn.returns)) if fn.returns else None


def _code_signature(fn) -> tuple[list[tuple[str, str | None]], str | None]:
    sig = inspect.signature(fn)
    params = [
        (p.name, _norm(p.annotation) if p.annotation is not inspect.Parameter.empty else None)
        for p in sig.parameters.values()
    ]
    ret = sig.return_annotation
    return params, _norm(ret) if ret is not inspect.Signature.empty else None


def test_reference_documents_exactly_the_hookspecs():
    documented = _sections()
    assert sorted(set(SPECS) - set(documented)) == [], "hookspecs missing from docs/authors/hooks.md"
    assert sorted(set(documented) - set(SPECS)) == [], "docs/authors/hooks.md documents hooks that do not exist"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_reference_signature_and_firstresult_match_the_code(name):
    section = _sections()[name]
    assert _documented_signature(name, section) == _code_signature(SPECS[name])
    firstresult = SPECS[name].famtune_spec["firstresult"]
    assert f"**firstresult:** {'yes' if firstresult else 'no'}" in section
    for part in ("**Called:**", "**Returns:**", "@famtune.hookimpl"):
        assert part in section, f"{name}: no {part} in its reference section"


def test_signature_parser_catches_a_difference():
    name = "famtune_resolve_model_source"
    section = f"```python\ndef {name}(spec: str, extra: int) -> str | None\n```"
    assert _documented_signature(name, section) != _code_signature(SPECS[name])
    section = f"```python\ndef {name}(spec: str) -> list[str]\n```"
    assert _documented_signature(name, section) != _code_signature(SPECS[name])


def test_user_and_author_docs_are_apart_and_linked():
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    for page in ("users/plugins.md", "authors/hooks.md", "authors/tutorial.md", "authors/migrating.md"):
        assert (DOCS / page).exists() and f"({page})" in index, page
    users = (DOCS / "users" / "plugins.md").read_text(encoding="utf-8")
    for topic in ("pip install", "famtune plugins", "FAMTUNE_LOAD_PLUGINS", "pip uninstall", "famtune plugins check"):
        assert topic in users, topic
    assert "@famtune.hookimpl" not in users  # writing plugins is the author docs' job
    tutorial = (DOCS / "authors" / "tutorial.md").read_text(encoding="utf-8")
    for step in (
        "famtune plugin new",
        "famtune plugins check",
        'pytest_plugins = ["famtune.testing"]',
        "examples/famtune-llama3",
    ):
        assert step in tutorial, step
    readme = (DOCS.parent / "README.md").read_text(encoding="utf-8")
    assert "docs/" in readme


def test_tutorial_excerpts_are_the_example_plugins_code():
    """Every python block of the tutorial that is code (not a signature) appears verbatim in a file of
    examples/famtune-llama3, which tests/test_example_plugin.py installs and runs."""
    tutorial = (DOCS / "authors" / "tutorial.md").read_text(encoding="utf-8")
    example = DOCS.parent / "examples" / "famtune-llama3"
    sources = {p: p.read_text(encoding="utf-8") for p in example.rglob("*.py")}
    blocks = re.findall(r"```python\n(.*?)```", tutorial, flags=re.DOTALL)
    assert len(blocks) >= 5
    for block in blocks:
        assert any(block in text for text in sources.values()), f"not in the example plugin:\n{block}"
