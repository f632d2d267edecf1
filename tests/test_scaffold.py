"""`famtune plugin new`: the generated package installs, is discovered, passes its own tests; broken
variants of it (real packages, pip-installed) are named and set aside while the rest keeps working."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from plugin_sites import build_wheels, famtune_on, install_wheels, plugin_env

from conftest import famtune_cli

ROOT = Path(__file__).resolve().parents[1]

# name -> (version, [(file, old, new)]): each breaks the generated plugin in one way.
BROKEN = {
    "noimport": ("0.2.0", [("plugin.py", "import famtune\n", "import famtune\nimport acme_runtime_not_installed\n")]),
    "typo": ("0.3.0", [("plugin.py", "def famtune_register_families(", "def famtune_register_familes(")]),
    "badfams": ("0.4.0", [("plugin.py", "    register(", "    register(object())\n    register(")]),
    "badclaim": (
        "0.5.0",
        [
            (
                "family.py",
                "    def claims(self, config: dict[str, Any], path: str) -> bool:\n",
                "    def claims(self, config: dict[str, Any], path: str) -> bool:\n"
                "        raise RuntimeError('the claim exploded')\n",
            )
        ],
    ),
    "twina": ("0.6.0", []),
    "twinb": ("0.7.0", [("family.py", '    name = "twinb"', '    name = "twina"')]),
}


def _famtune(*args: str, target: Path | None = None, python: str = sys.executable, **extra: str):
    return famtune_on(target, *args, python=python, **extra)


def _edit(pkg: Path, name: str, version: str, edits) -> None:
    module = pkg / f"famtune_{name}"
    for file, old, new in edits:
        text = (module / file).read_text()
        assert old in text, f"the scaffold changed: {old!r} is not in {file}"
        (module / file).write_text(text.replace(old, new, 1))
    py = pkg / "pyproject.toml"
    py.write_text(py.read_text().replace('version = "0.1.0"', f'version = "{version}"'))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Generated packages (acme, a faulty one, the broken ones) and their wheels."""
    root = tmp_path_factory.mktemp("scaffold")
    for name in ["acme", "faulty", *BROKEN]:
        famtune_cli("plugin", "new", name, "--dir", str(root))
    # The end-of-turn token left unsupervised: a model trained so never learns to stop.
    _edit(
        root / "famtune-faulty",
        "faulty",
        "0.1.0",
        [("template.py", "assistant_suffix=EOT,", 'assistant_suffix="", assistant_trailer=EOT,')],
    )
    for name, (version, edits) in BROKEN.items():
        _edit(root / f"famtune-{name}", name, version, edits)
    wheels = build_wheels(root / "wheels", *sorted(root.glob("famtune-*")))
    return root, wheels


def _install(wheels: Path, target: Path, *names: str) -> Path:
    return install_wheels(target, *(next(wheels.glob(f"famtune_{n}-*.whl")) for n in names))


def test_generated_package_layout(built, tmp_path):
    root, _ = built
    pkg = Path(famtune_cli("plugin", "new", "acme", "--dir", str(tmp_path)).stdout.split(" to ")[1].split(";")[0])
    assert pkg == tmp_path.resolve() / "famtune-acme"
    assert sorted(str(p.relative_to(pkg)) for p in pkg.rglob("*") if p.is_file()) == [
        "README.md",
        "famtune_acme/__init__.py",
        "famtune_acme/family.py",
        "famtune_acme/plugin.py",
        "famtune_acme/template.py",
        "famtune_acme/tiny.py",
        "pyproject.toml",
        "tests/test_plugin.py",
    ]
    assert '[project.entry-points.famtune]\nacme = "famtune_acme.plugin"' in (pkg / "pyproject.toml").read_text()
    # Generated from the example plugin's files, renamed: no second copy of the plugin to drift.
    example = ROOT / "examples" / "famtune-llama3" / "famtune_llama3"
    for file in ("plugin.py", "family.py", "template.py", "tiny.py"):
        ours = (pkg / "famtune_acme" / file).read_text()
        theirs = (example / file).read_text()
        assert ours == theirs.replace("famtune_llama3", "famtune_acme").replace("Llama3", "Acme").replace(
            "LLAMA3", "ACME"
        ).replace("llama3", "acme"), file
    assert "def famtune_register_families(" in (pkg / "famtune_acme" / "plugin.py").read_text()
    res = _famtune("plugin", "new", "acme", "--dir", str(root))
    assert res.returncode == 2 and "already exists and is not empty" in res.stderr
    res = _famtune("plugin", "new", "Bad Name", "--dir", str(root))
    assert res.returncode == 2 and "plugin name 'Bad Name' is not usable" in res.stderr


def test_generated_plugin_is_discovered_in_a_fresh_venv(built, tmp_path):
    """A new virtualenv with only the famtune core and the generated plugin, both installed from wheels."""
    _, wheels = built
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "env")], check=True)
    py = tmp_path / "env" / "bin" / "python"
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    import pluggy

    (tmp_path / "borrowed").mkdir()
    (tmp_path / "borrowed" / "pluggy").symlink_to(Path(pluggy.__file__).parent)
    Path(purelib, "borrowed_pluggy.pth").write_text(f"{tmp_path / 'borrowed'}\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    pip = [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index"]
    subprocess.run(
        [*pip, *map(str, tmp_path.glob("famtune-*.whl")), str(next(wheels.glob("famtune_acme-*.whl")))],
        check=True,
        capture_output=True,
    )
    res = _famtune("plugins", "--json", python=str(py))
    listed = json.loads(res.stdout)
    assert [(p["name"], p["distribution"], p["version"], p["families"]) for p in listed["plugins"]] == [
        ("acme", "famtune-acme", "0.1.0", ["acme"])
    ]
    assert listed["plugins"][0]["hooks"] == ["famtune_register_families"] and listed["broken"] == []


def test_generated_plugin_passes_its_own_tests(built, tmp_path):
    """Its tests prove discovery and run famtune's conformance suite (pytest_plugins = ["famtune.testing"])."""
    root, wheels = built
    target = _install(wheels, tmp_path / "site", "acme")
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(root / "famtune-acme" / "tests")],
        capture_output=True,
        text=True,
        env=plugin_env(target),
        cwd=tmp_path,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:]
    assert "3 passed" in res.stdout


def test_conformance_catches_an_unsupervised_end_of_turn(built, tmp_path):
    _, wheels = built
    target = _install(wheels, tmp_path / "site", "faulty")
    res = _famtune("plugins", "check", "faulty", "--json", target=target)
    assert res.returncode == 1, res.stderr[-2000:]
    report = json.loads(res.stdout)
    status = {r["check"]: r["status"] for r in report["results"]}
    assert status["supervision"] == "fail" and status["stop ids"] == "fail"
    [sup] = [r for r in report["results"] if r["check"] == "supervision"]
    assert "does not end with a stop id" in sup["detail"]
    # Everything that does not depend on the labels still passes, so the report points at the one fault.
    assert {k for k, v in status.items() if v == "pass"} == {
        "claim",
        "template",
        "targets",
        "qlora step",
        "merge",
        "packing",
    }


def test_broken_plugins_are_named_and_the_rest_keep_working(built, tmp_path, tiny_qwen25):
    _, wheels = built
    target = _install(wheels, tmp_path / "site", *BROKEN)
    listed = json.loads(_famtune("plugins", "--json", target=target).stdout)
    broken = {b["name"]: b for b in listed["broken"]}
    assert sorted(broken) == ["badfams", "noimport", "twina", "twinb", "typo"]
    for name, b in broken.items():
        assert (b["distribution"], b["version"]) == (f"famtune-{name}", BROKEN[name][0])
    assert "No module named 'acme_runtime_not_installed'" in broken["noimport"]["error"]
    assert "'famtune_register_familes' (misspelled?)" in broken["typo"]["error"]
    assert "registered object, not a famtune.family.ModelFamily" in broken["badfams"]["error"]
    assert "family 'twina' is also provided by plugin 'twinb' (famtune-twinb 0.7.0)" in broken["twina"]["error"]
    assert "plugin 'twina' (famtune-twina 0.6.0)" in broken["twinb"]["error"]
    loaded = [p["name"] for p in listed["plugins"]]
    assert "qwen" in loaded and "badclaim" in loaded

    text = _famtune("plugins", target=target)
    assert text.returncode == 0
    assert "twinb (famtune-twinb 0.7.0): DISABLED: family 'twina'" in text.stdout

    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    res = _famtune("data", "check", str(data), "--model", str(tiny_qwen25), target=target)
    assert res.returncode == 0, res.stderr
    warnings = [line for line in res.stderr.splitlines() if line.startswith("famtune: warning:")]
    for name in ("noimport", "typo", "badfams", "twina", "twinb"):
        assert any(f"plugin '{name}' (famtune-{name} {BROKEN[name][0]}) is disabled" in w for w in warnings), name
    assert any(
        "plugin 'badclaim' (famtune-badclaim 0.5.0): family 'badclaim' claims() raised RuntimeError: "
        "the claim exploded" in w
        for w in warnings
    )

    bypass = _famtune("plugins", "--json", target=target, FAMTUNE_LOAD_PLUGINS="")
    assert bypass.returncode == 0 and bypass.stderr == ""
    assert json.loads(bypass.stdout) == {"plugins": [], "broken": []}
    assert _famtune("--help", target=target, FAMTUNE_LOAD_PLUGINS="").returncode == 0
