"""The plugin contract: discovery through entry points, the allow-list, claims and validation."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import famtune
from famtune import hookspecs, hookspecs_v1
from famtune.errors import FamtuneError, PluginError
from famtune.plugins import PluginSet
from famtune.types import PluginInfo

ROOT = Path(__file__).resolve().parents[1]


def _site_packages(python: Path) -> str:
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory):
    """A new virtualenv holding only the famtune core (plus pluggy, borrowed from this environment)."""
    root = tmp_path_factory.mktemp("env")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "env")], check=True)
    py = root / "env" / "bin" / "python"
    import pluggy

    borrowed = root / "borrowed"
    borrowed.mkdir()
    (borrowed / "pluggy").symlink_to(Path(pluggy.__file__).parent)
    Path(_site_packages(py), "borrowed_pluggy.pth").write_text(f"{borrowed}\n")
    wheels = root / "wheels"
    # Wheels are built here (setuptools lives in this environment) and installed into the new one.
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
            str(wheels),
            str(ROOT),
            str(ROOT / "plugins" / "qwen"),
        ],
        check=True,
        capture_output=True,
    )
    pip = [sys.executable, "-m", "pip", "--python", str(py), "-q"]
    subprocess.run(
        [*pip, "install", "--no-deps", *map(str, wheels.glob("famtune-*.whl"))], check=True, capture_output=True
    )
    return py, pip, wheels


def _famtune(py: Path, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FAMTUNE_LOAD_PLUGINS"}
    env.update(env_extra or {})
    return subprocess.run([str(py), "-m", "famtune.cli", *args], capture_output=True, text=True, env=env)


def test_plugin_installed_by_pip_is_discovered_and_uninstall_removes_it(fresh_env, tmp_path):
    py, pip, wheels = fresh_env
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')

    subprocess.run(
        [*pip, "install", "--no-deps", *map(str, wheels.glob("famtune_qwen-*.whl"))], check=True, capture_output=True
    )
    listed = json.loads(_famtune(py, "plugins", "--json").stdout)
    [qwen] = [p for p in listed["plugins"] if p["name"] == "qwen"]
    assert qwen["distribution"] == "famtune-qwen"
    assert "qwen2.5" in qwen["families"] and qwen["hooks"] == ["famtune_recipe_dirs", "famtune_register_families"]

    subprocess.run([*pip, "uninstall", "-y", "famtune-qwen"], check=True, capture_output=True)
    assert json.loads(_famtune(py, "plugins", "--json").stdout)["plugins"] == []
    res = _famtune(py, "data", "check", str(data), "--model", str(model))
    assert res.returncode == 2
    assert "no installed plugin claims model_type qwen2" in res.stderr
    assert "installed: none" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_empty_allow_list_loads_no_plugin():
    res = subprocess.run(
        [sys.executable, "-m", "famtune.cli", "plugins", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "FAMTUNE_LOAD_PLUGINS": ""},
    )
    assert res.returncode == 0
    assert json.loads(res.stdout)["plugins"] == []
    listed = subprocess.run(
        [sys.executable, "-m", "famtune.cli", "plugins", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "FAMTUNE_LOAD_PLUGINS": "qwen"},
    )
    assert [p["name"] for p in json.loads(listed.stdout)["plugins"]] == ["qwen"]


def test_help_does_not_import_torch():
    code = (
        "import sys; from famtune.cli import main; main(['--help']) if False else None; "
        "import famtune.cli, famtune.plugins, famtune.checkpoint, famtune.samples; "
        "print('torch' in sys.modules or 'transformers' in sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"
    helped = subprocess.run([sys.executable, "-m", "famtune.cli", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "train" in helped.stdout and "merge" in helped.stdout


# -- claims and validation, with small real pluggy plugins -------------------------------------------


def _plugin(name: str, family: str, claims: bool, **hooks) -> types.SimpleNamespace:
    @famtune.hookimpl
    def famtune_families():
        return [family]

    @famtune.hookimpl
    def famtune_claim_checkpoint(config, path):
        return family if claims else None

    ns = types.SimpleNamespace(famtune_families=famtune_families, famtune_claim_checkpoint=famtune_claim_checkpoint)
    for hook_name, fn in hooks.items():
        setattr(ns, hook_name, famtune.hookimpl(fn))
    return ns


def _set(*plugins: tuple[str, types.SimpleNamespace]) -> PluginSet:
    ps = PluginSet()
    for name, mod in plugins:
        ps.register(mod, PluginInfo(name, f"famtune-{name}", "9.9"))
    ps._check_pending()
    return ps


def test_no_claim_names_every_installed_plugin():
    ps = _set(("alpha", _plugin("alpha", "fam-a", False)), ("beta", _plugin("beta", "fam-b", False)))
    with pytest.raises(FamtuneError) as err:
        ps.claim({"model_type": "mystery"}, "/m")
    msg = str(err.value)
    assert "no installed plugin claims model_type mystery" in msg
    assert "alpha (famtune-alpha 9.9: fam-a)" in msg and "beta (famtune-beta 9.9: fam-b)" in msg


def test_two_claims_are_an_error_whatever_the_order():
    for order in ((0, 1), (1, 0)):
        plugins = [("alpha", _plugin("alpha", "fam-a", True)), ("beta", _plugin("beta", "fam-b", True))]
        ps = _set(*(plugins[i] for i in order))
        with pytest.raises(FamtuneError) as err:
            ps.claim({"model_type": "x"}, "/m")
        assert "several plugins claim model_type x" in str(err.value)
        assert "famtune-alpha 9.9" in str(err.value) and "famtune-beta 9.9" in str(err.value)


def test_misspelled_hook_disables_that_plugin_only():
    bad = _plugin("typo", "fam-t", True)
    bad.famtune_encode_conversaton = famtune.hookimpl(lambda family: None)
    ps = _set(("typo", bad), ("good", _plugin("good", "fam-g", True)))
    assert list(ps.infos) == ["good"]
    assert ps.broken[0].info.name == "typo" and "famtune_encode_conversaton" in ps.broken[0].error
    assert ps.claim({}, "/m").name == "fam-g"


def test_wrong_answers_name_plugin_distribution_and_version():
    from famtune.encoding import EncodedConversation

    def enc(family, tokenizer, messages, masking, add_generation_prompt):
        return EncodedConversation([1, 2, 3], [-100, 2])

    def unsupervised(family, tokenizer, messages, masking, add_generation_prompt):
        return EncodedConversation([1, 2, 3], [-100, -100, -100])

    class Tok:
        def __len__(self):
            return 10

    fam = _set(("short", _plugin("short", "f", True, famtune_encode_conversation=enc))).claim({}, "/m")
    with pytest.raises(
        PluginError,
        match=r"plugin 'short' \(famtune-short 9\.9\): famtune_encode_conversation "
        r"gave 3 ids but 2 labels",
    ):
        fam.encode(Tok(), [], "all_assistant")
    fam = _set(("none", _plugin("none", "f", True, famtune_encode_conversation=unsupervised))).claim({}, "/m")
    with pytest.raises(PluginError, match="famtune-none 9.9.*supervised no token"):
        fam.encode(Tok(), [], "all_assistant")

    from famtune.types import GenerationDefaults

    fam = _set(
        (
            "gen",
            _plugin(
                "gen", "f", True, famtune_generation_defaults=lambda family, tokenizer: GenerationDefaults([3, 42])
            ),
        )
    ).claim({}, "/m")
    with pytest.raises(PluginError, match=r"famtune-gen 9\.9.*stop id 42 is not in the tokenizer"):
        fam.generation_defaults(Tok())


def test_targets_must_exist_and_never_be_the_head():
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.ModuleDict({"q_proj": torch.nn.Linear(2, 2)})])
            self.lm_head = torch.nn.Linear(2, 3)

        def get_output_embeddings(self):
            return self.lm_head

    for targets, why in ((["q_proj", "nope"], "'nope' does not exist"), (["lm_head"], "is the output head")):
        fam = _set(
            ("t", _plugin("t", "f", True, famtune_lora_target_modules=lambda family, model, mode, t=targets: t))
        ).claim({}, "/m")
        with pytest.raises(PluginError, match=f"famtune-t 9.9.*{why}"):
            fam.lora_target_modules(Tiny(), "default")


def test_every_hookspec_is_documented_with_its_firstresult_behaviour():
    specs = [
        f
        for module in (hookspecs, hookspecs_v1)
        for n, f in inspect.getmembers(module, inspect.isfunction)
        if n.startswith("famtune_")
    ]
    assert len(specs) >= 18
    for fn in specs:
        doc = inspect.getdoc(fn) or ""
        firstresult = fn.famtune_spec["firstresult"]
        assert "Called" in doc, fn.__name__
        assert ("Stops at first non-None result" in doc) == firstresult, fn.__name__
        assert firstresult or "Not firstresult" in doc, fn.__name__
        assert all(p.annotation is not inspect.Parameter.empty for p in inspect.signature(fn).parameters.values())
