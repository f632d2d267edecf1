"""Cross-cutting hooks: a third-party plugin adds a masking policy, a data format, a model source and
a training callback to families it does not touch, through pluggy with famtune's defaults trylast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from famtune.encoding import IGNORE_INDEX
from famtune.errors import FamtuneError
from famtune.plugins import PluginSet
from famtune.types import PluginInfo

# An installed plugin: a module plus the dist-info that puts it in the famtune entry-point group.
EXTENSION = """
import os

import famtune
from famtune.family import DataFormat, MaskingPolicy


def first_turn(enc):
    return [i if t == 0 else -100 for i, t in zip(enc.input_ids, enc.turns)]


def qa_to_messages(record):
    if not isinstance(record.get("a"), str):
        raise ValueError('"a" must be the answer text')
    return [{"role": "user", "content": record["q"]}, {"role": "assistant", "content": record["a"]}]


@famtune.hookimpl
def famtune_register_masking_policies(register):
    register(MaskingPolicy("first_turn", first_turn, "only the first assistant turn"))


@famtune.hookimpl
def famtune_register_data_formats(register):
    register(DataFormat("qa", "q", qa_to_messages, "{q, a} pairs"))


@famtune.hookimpl
def famtune_register_commands(subparsers):
    p = subparsers.add_parser("ext-hello", help="say hello from the extension")
    p.add_argument("who")
    p.set_defaults(func=lambda args, extra: print(f"hello {args.who}") or 0)


class Tracker:
    def on_log(self, step, metrics):
        with open(os.environ["TRACKED"], "a") as f:
            f.write(f"{step} {metrics['loss']:.6f}\\n")

    def on_train_end(self, summary):
        with open(os.environ["TRACKED"], "a") as f:
            f.write(f"end {summary['steps']}\\n")


@famtune.hookimpl
def famtune_training_callbacks(recipe):
    return [Tracker()] if "TRACKED" in os.environ else []


@famtune.hookimpl
def famtune_resolve_model_source(spec):
    if spec.startswith("shelf:"):
        return os.path.join(os.environ["SHELF"], spec.removeprefix("shelf:"))
    return None
"""


def install_extension(site: Path) -> Path:
    site.mkdir(parents=True, exist_ok=True)
    (site / "famtune_ext.py").write_text(textwrap.dedent(EXTENSION))
    dist = site / "famtune_ext-0.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: famtune-ext\nVersion: 0.3\n")
    (dist / "entry_points.txt").write_text("[famtune]\next = famtune_ext\n")
    return site


def _famtune(site: Path, *args: str, **env: str):
    environ = {k: v for k, v in os.environ.items() if k != "FAMTUNE_LOAD_PLUGINS"}
    environ.update(PYTHONPATH=str(site), **env)
    return subprocess.run(
        [sys.executable, "-m", "famtune.cli", *map(str, args)], capture_output=True, text=True, env=environ, timeout=300
    )


def test_extension_adds_a_masking_policy_and_a_data_format_to_an_existing_family(tmp_path, tiny_qwen25):
    site = install_extension(tmp_path / "site")
    data = tmp_path / "qa.jsonl"
    data.write_text(
        json.dumps({"q": "Who are you?", "a": "A tiny model."})
        + "\n"
        + json.dumps({"q": "Name a colour.", "a": "Blue."})
        + "\n"
    )
    res = _famtune(
        site,
        "data",
        "check",
        data,
        "--model",
        f"shelf:{tiny_qwen25.name}",
        "--masking",
        "first_turn",
        SHELF=str(tiny_qwen25.parent),
    )
    assert res.returncode == 0, res.stderr
    # The qwen plugin was not touched, yet qwen2.5 now offers the policy and reads the format.
    assert (
        "family qwen2.5, masking first_turn (offered: all_assistant, last_turn, train_on_prompt, first_turn)"
        in res.stdout
    )
    assert "[[A tiny model.<|im_end|>]]" in res.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"q": "Who are you?", "a": 3}) + "\n")
    res = _famtune(site, "data", "check", bad, "--model", str(tiny_qwen25))
    assert res.returncode != 0
    assert (
        res.stderr.strip()
        .splitlines()[-1]
        .startswith(f'famtune: error: {bad}:1: qa record: "a" must be the answer text')
    )


def test_policy_from_another_plugin_labels_through_the_family_facade(tmp_path, tiny_qwen25):
    from famtune.checkpoint import open_checkpoint

    sys.path.insert(0, str(install_extension(tmp_path / "site")))
    try:
        plugins = PluginSet()
        plugins.load_entry_points()  # finds the extension's entry point on sys.path
        assert plugins.infos["ext"] == PluginInfo("ext", "famtune-ext", "0.3")
    finally:
        sys.path.remove(str(tmp_path / "site"))
        sys.modules.pop("famtune_ext", None)
    tokenizer = open_checkpoint(str(tiny_qwen25)).load_tokenizer()
    family = plugins.claim({}, "", family="qwen2.5")
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "One."},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "Two."},
    ]
    first = family.encode(tokenizer, messages, "first_turn")
    every = family.encode(tokenizer, messages, "all_assistant")
    assert first.input_ids == every.input_ids
    supervised = [t for t, label in zip(first.input_ids, first.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(supervised) == "One.<|im_end|>"
    assert "first_turn" in family.masking_policies() and "qa" in plugins.data_formats()


def test_famtune_defaults_answer_last_and_an_unknown_source_is_one_error(tmp_path):
    plugins = PluginSet()
    assert plugins.resolve_model_source(str(tmp_path)) == str(tmp_path)
    with pytest.raises(FamtuneError, match="no such model directory"):
        plugins.resolve_model_source(str(tmp_path / "missing" / "x" / "y"))
    impls = [i.plugin_name for i in plugins.pm.hook.famtune_resolve_model_source.get_hookimpls()]
    assert impls == ["famtune.builtins"]
    assert plugins.pm.hook.famtune_resolve_model_source.get_hookimpls()[0].trylast


def test_two_plugins_registering_one_policy_are_both_disabled():
    import types

    import famtune
    from famtune.family import MaskingPolicy

    def plugin():
        ns = types.SimpleNamespace()
        ns.famtune_register_masking_policies = famtune.hookimpl(
            lambda register: register(MaskingPolicy("mine", lambda enc: list(enc.input_ids)))
        )
        return ns

    plugins = PluginSet()
    plugins.register(plugin(), PluginInfo("a", "famtune-a", "1.0"))
    plugins.register(plugin(), PluginInfo("b", "famtune-b", "2.0"))
    plugins._check_pending()
    assert "mine" not in plugins.masking_policies() and not plugins.infos
    errors = {b.info.name: b.error for b in plugins.broken}
    assert "masking policy 'mine' is also provided by plugin 'b' (famtune-b 2.0)" in errors["a"]
    assert "plugin 'a' (famtune-a 1.0)" in errors["b"]


def test_extension_adds_a_command(tmp_path):
    site = install_extension(tmp_path / "site")
    listed = json.loads(_famtune(site, "plugins", "--json").stdout)
    [ext] = [p for p in listed["plugins"] if p["name"] == "ext"]
    assert (ext["families"], ext["masking_policies"], ext["data_formats"]) == ([], ["first_turn"], ["qa"])
    assert "  masking policies: first_turn" in _famtune(site, "plugins").stdout
    res = _famtune(site, "ext-hello", "world")
    assert (res.returncode, res.stdout) == (0, "hello world\n"), res.stderr
    assert "ext-hello" in _famtune(site, "--help").stdout


@pytest.mark.slow
def test_extension_tracks_a_training_run(tmp_path, tiny_qwen25):
    site = install_extension(tmp_path / "site")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in [("Hi?", "Hello."), ("Name?", "Tiny.")]))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {tiny_qwen25}\ndata: {data}\noutput_dir: {tmp_path / 'out'}\nquantization: none\n"
        "compute_dtype: fp32\nmax_steps: 2\nbatch_size: 2\nlora_r: 4\nlogging_steps: 1\n"
        "gradient_checkpointing: false\nprogress: false\nmasking: first_turn\n"
    )
    tracked = tmp_path / "tracked.txt"
    res = _famtune(site, "train", recipe, TRACKED=str(tracked))
    assert res.returncode == 0, res.stderr[-3000:]
    lines = tracked.read_text().splitlines()
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = {m["step"]: m["loss"] for m in metrics if "loss" in m}
    assert lines == [f"1 {losses[1]:.6f}", f"2 {losses[2]:.6f}", "end 2"]
