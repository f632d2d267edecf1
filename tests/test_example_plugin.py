"""The out-of-tree example plugin (examples/famtune-llama3): pip-installed offline from a wheel into a
fresh target directory, discovered, conformant, and used for a QLoRA run, all through the CLI."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
from plugin_sites import famtune_on, plugin_site

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "famtune-llama3"
# The modules docs/authors/hooks.md lists as famtune's public plugin API.
PUBLIC_API = {
    "famtune",
    "famtune.family",
    "famtune.chatformat",
    "famtune.convert",
    "famtune.encoding",
    "famtune.types",
    "famtune.tiny",
}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return plugin_site(EXAMPLE, tmp_path_factory.mktemp("example"), "famtune_llama3-0.1.0-*.whl")


@pytest.fixture(scope="module")
def checked(site, tmp_path_factory):
    work = tmp_path_factory.mktemp("check")
    res = famtune_on(site, "plugins", "check", "llama3", "--json", "--workdir", work)
    return res, work


def test_not_installed_here_but_discovered_from_the_target(site):
    import importlib.util

    assert importlib.util.find_spec("famtune_llama3") is None  # out of tree: only the target has it
    listed = json.loads(famtune_on(site, "plugins", "--json").stdout)
    [me] = [p for p in listed["plugins"] if p["name"] == "llama3"]
    assert (me["distribution"], me["version"], me["families"]) == ("famtune-llama3", "0.1.0", ["llama3"])
    assert me["hooks"] == ["famtune_register_families"]  # contract v2: registration only
    assert listed["broken"] == []


def test_passes_famtune_plugins_check(checked):
    res, _ = checked
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads(res.stdout)
    assert (report["plugin"], report["distribution"], report["ok"]) == ("llama3", "famtune-llama3", True)
    assert [(r["check"], r["status"]) for r in report["results"]] == [
        ("claim", "pass"),
        ("template", "pass"),
        ("supervision", "pass"),
        ("stop ids", "pass"),
        ("targets", "pass"),
        ("qlora step", "pass"),
        ("merge", "pass"),
        ("packing", "pass"),
    ]


def test_qlora_run_with_the_example(site, checked, tmp_path):
    _, work = checked
    tiny = work / "llama3" / "tiny"
    data = tmp_path / "data.jsonl"
    rows = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        for q, a in [("Who are you?", "A tiny Llama."), ("What is 2 + 3?", "5."), ("Name a colour.", "Blue.")]
    ]
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {tiny}\ndata: {data}\noutput_dir: {tmp_path / 'out'}\nquantization: nf4\n"
        "compute_dtype: fp32\nmax_steps: 3\nbatch_size: 3\nlearning_rate: 0.01\nlora_r: 4\n"
        "gradient_checkpointing: false\nprogress: false\n"
    )
    res = famtune_on(site, "train", recipe)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 3 and math.isfinite(summary["final_loss"])
    meta = json.loads((tmp_path / "out" / "famtune.json").read_text())
    assert meta["plugin"]["distribution"] == "famtune-llama3" and meta["family"] == "llama3"
    assert meta["template"] == "famtune-llama3"
    assert "family llama3" in res.stdout  # claimed by the example, not forced by the recipe


def test_example_uses_only_the_public_api():
    imported = set()
    for path in (EXAMPLE / "famtune_llama3").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names)
    famtune_modules = {m for m in imported if m == "famtune" or m.startswith("famtune.")}
    assert famtune_modules and famtune_modules <= PUBLIC_API, famtune_modules - PUBLIC_API
    reference = (ROOT / "docs" / "authors" / "hooks.md").read_text()
    assert all(f"`{m}`" in reference for m in PUBLIC_API)
