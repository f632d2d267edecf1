"""The CLI explains itself: every option has help and shows its default, `train --help` lists the
recipe keys, and `famtune env` reports versions, device and known-bad combinations."""

from __future__ import annotations

import argparse
import dataclasses
from importlib import metadata

import pytest

from conftest import famtune_cli
from famtune.cli import build_parser
from famtune.envinfo import collect_env, env_lines, known_problems
from famtune.recipe import Recipe
from famtune.recipe_help import KEY_MEANINGS


def _parsers(parser: argparse.ArgumentParser, path: str = "famtune"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


PARSERS = dict(_parsers(build_parser()))


@pytest.mark.parametrize("path", sorted(PARSERS))
def test_every_option_has_help_and_shows_its_default(path):
    parser = PARSERS[path]
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{path}: {name} has no help text"
        if action.default not in (None, False, argparse.SUPPRESS):
            assert f"(default: {action.default})" in " ".join(text.split()), f"{path}: {name} hides its default"


def test_there_are_many_options_and_subcommands():
    # guards the walk above: it must reach nested subcommands
    assert {"famtune data convert", "famtune recipes copy", "famtune plugins check", "famtune env"} <= set(PARSERS)


def test_train_help_lists_every_recipe_key_with_default_and_meaning():
    res = famtune_cli("train", "--help")
    lines = {ln.split()[0]: ln for ln in res.stdout.splitlines() if ln.startswith("  ") and ln.split()}
    for f in dataclasses.fields(Recipe):
        assert f.name in lines, f"recipe key {f.name} missing from famtune train --help"
        assert f.name in KEY_MEANINGS, f"recipe key {f.name} has no meaning in famtune.recipe_help"
    assert lines["lora_r"].split()[1] == "8" and lines["learning_rate"].split()[1] == "0.0002"
    assert lines["system"].split()[1] == "null" and "system prompt for samples" in lines["system"]


def test_env_prints_versions_plugins_device_and_bitsandbytes():
    res = famtune_cli("env")
    out = res.stdout
    for lib in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        assert f"  {lib}" in out and metadata.version(lib) in out, lib
    assert "famtune-qwen 0.1.0: qwen1" in out
    assert "device: cpu" in out or "device: cuda" in out
    assert "bitsandbytes: " in out and "backend, " in out


def _env(**changes):
    env = collect_env()
    for key, value in changes.items():
        env[key] = {**env[key], **value} if isinstance(value, dict) else value
    return env


def test_known_bad_combinations_are_warned_about():
    env = collect_env()
    assert known_problems(env) == [] or all("outside" not in p for p in known_problems(env))
    gpu_cpu_bnb = _env(
        device={"cuda_available": True, "torch_cuda": "12.4", "bf16_supported": True},
        bitsandbytes={"backend": "CPU", "library": "/x/libbitsandbytes_cpu.so"},
    )
    assert any("CUDA is available but bitsandbytes loaded its CPU library" in p for p in known_problems(gpu_cpu_bnb))
    old_peft = _env(libraries={"peft": "0.10.0"})
    assert any(p.startswith("peft 0.10.0 is outside what famtune requires (>=") for p in known_problems(old_peft))
    no_bf16 = _env(device={"cuda_available": True, "torch_cuda": "12.4", "bf16_supported": False, "capability": "7.5"})
    assert any("has no bf16" in p for p in known_problems(no_bf16))
    assert any("no family plugin is loaded" in p for p in known_problems(_env(plugins=[])))
    assert "warning: no family plugin is loaded" in "\n".join(env_lines(_env(plugins=[])))
