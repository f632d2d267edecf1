"""Built-in recipes: every shipped recipe is a valid recipe with a well-formed model id and readable
bundled data, each family ships identity and multi-turn recipes, and list/copy work from the CLI."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import yaml

import famtune
from conftest import famtune_cli
from famtune.data import read_conversations
from famtune.errors import FamtuneError
from famtune.plugins import PluginSet, get_plugins
from famtune.recipe import Recipe, load_recipe
from famtune.recipes import builtin_recipes, copy_recipe, is_model_source, list_recipes
from famtune.types import PluginInfo

RECIPES = builtin_recipes()


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_builtin_recipe_is_valid(name):
    recipe = RECIPES[name]
    raw = yaml.safe_load(recipe.path.read_text(encoding="utf-8"))
    assert set(raw) <= set(Recipe.keys()), f"{name}: unknown keys {set(raw) - set(Recipe.keys())}"
    loaded = load_recipe(str(recipe.path))  # types, values, and relative data resolved beside the recipe
    assert is_model_source(loaded.model), f"{name}: model {loaded.model!r} is not Org/Name or modelscope:Org/Name"
    assert recipe.description, f"{name}: no description comment on its first line"
    assert recipe.data_files(), f"{name}: ships no data"
    for key in ("data", "eval_data"):
        path = getattr(loaded, key)
        if path:
            assert Path(path).is_file(), f"{name}: {key} {path} is not bundled"
            report = read_conversations(path, loaded.data_format)
            assert report.conversations and not report.skipped


def test_each_family_plugin_ships_identity_and_multiturn_recipes():
    by_plugin: dict[str, list[str]] = {}
    for r in RECIPES.values():
        by_plugin.setdefault(r.plugin, []).append(r.name)
    assert set(by_plugin) >= {"qwen", "internlm2", "baichuan2", "chatglm"}
    for plugin, names in by_plugin.items():
        assert any("identity" in n for n in names), plugin
        multi = [n for n in names if "multiturn" in n]
        assert multi, plugin
        data = load_recipe(str(RECIPES[multi[0]].path)).data
        turns = [sum(m["role"] == "assistant" for m in c.messages) for c in read_conversations(data).conversations]
        assert max(turns) >= 2, f"{multi[0]}: no multi-turn conversation in its data"


def test_the_tutorials_setups_are_shipped():
    coach = load_recipe(str(RECIPES["internlm2-chat-7b-qlora-career-coach"].path))
    assert coach.system and "internlm2-chat-7b" in coach.model
    medqa = load_recipe(str(RECIPES["internlm2-chat-7b-qlora-medqa"].path))
    assert read_conversations(medqa.data).format == "conversation"
    packed = load_recipe(str(RECIPES["internlm2-chat-1.8b-qlora-identity-packed"].path))
    assert packed.packing is True and packed.max_length == 1024 and "1_8b" in packed.model
    baichuan = load_recipe(str(RECIPES["baichuan2-7b-chat-qlora-identity"].path))
    assert baichuan.quantization == "nf4" and "Baichuan2-7B-Chat" in baichuan.model


def test_model_source_syntax():
    assert is_model_source("internlm/internlm2-chat-7b")
    assert is_model_source("modelscope:Shanghai_AI_Laboratory/internlm2-chat-1_8b")
    for bad in ("internlm2-chat-7b", "/models/x", "a/b/c", "modelscope:x", "hf:org/name", "org/ name"):
        assert not is_model_source(bad), bad


def test_list_filters_and_copy_brings_the_data(tmp_path):
    names = [r.name for r in list_recipes("medqa")]
    assert names == ["internlm2-chat-7b-qlora-medqa"]
    assert {r.name for r in list_recipes("internlm2*identity*")} == {
        "internlm2-chat-7b-qlora-identity",
        "internlm2-chat-1.8b-qlora-identity-packed",
    }
    out = copy_recipe("internlm2-chat-7b-qlora-medqa", str(tmp_path / "cfg"))
    assert out == tmp_path / "cfg" / "internlm2-chat-7b-qlora-medqa.yaml"
    loaded = load_recipe(str(out))
    assert Path(loaded.data).parent == tmp_path / "cfg" / "data"  # the copy reads its own data
    with pytest.raises(FamtuneError, match="already exists"):
        copy_recipe("internlm2-chat-7b-qlora-medqa", str(tmp_path / "cfg"))
    with pytest.raises(FamtuneError, match="did you mean internlm2-chat-7b-qlora-medqa"):
        copy_recipe("internlm2-chat-7b-qlora-medq")


def test_cli_list_and_copy(tmp_path):
    res = famtune_cli("recipes", "list", "identity")
    lines = res.stdout.splitlines()
    assert len(lines) == sum("identity" in n for n in RECIPES) and all("identity" in ln for ln in lines)
    assert "[baichuan2]" in res.stdout
    res = famtune_cli("recipes", "copy", "qwen2.5-7b-instruct-qlora-identity", tmp_path / "mine.yaml")
    assert (tmp_path / "mine.yaml").is_file() and (tmp_path / "data" / "identity.jsonl").is_file()
    res = famtune_cli("recipes", "list", "no-such-recipe", check=False)
    assert res.returncode == 1 and "no built-in recipe matches" in res.stdout


def test_a_recipe_name_shipped_by_two_plugins_is_an_error(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "same.yaml").write_text("# same\nmodel: org/x\ndata: d.jsonl\n")
    plugins = PluginSet()
    for sub in ("a", "b"):
        module = types.SimpleNamespace(famtune_recipe_dirs=famtune.hookimpl(lambda d=str(tmp_path / sub): [d]))
        plugins.register(module, PluginInfo(f"plug{sub}", f"famtune-plug{sub}", "1.0"))
    with pytest.raises(
        FamtuneError, match=r"'same' is shipped by both plugin 'pluga' \(famtune-pluga 1.0\) and plugin 'plugb'"
    ):
        builtin_recipes(plugins)


def test_the_recipe_hook_is_answered_by_the_installed_plugins():
    plugins = get_plugins()
    assert all("famtune_recipe_dirs" in plugins.hooks_of(n) for n in ("qwen", "internlm2", "baichuan2", "chatglm"))
