"""The conformance suite against the built-in plugins: every family with a tiny checkpoint passes."""

from __future__ import annotations

import pytest

from conftest import famtune_cli
from famtune.plugins import Family, get_plugins
from famtune.testing import check_plugin

CHECKS = ["claim", "template", "supervision", "stop ids", "targets", "qlora step", "merge", "packing"]


@pytest.mark.parametrize("plugin", ["qwen", "baichuan2", "internlm2", "chatglm"])
def test_builtin_plugin_passes(plugin, tmp_path):
    report = check_plugin(plugin, tmp_path)
    assert report.ok, report.text()
    plugins = get_plugins()
    by_family: dict[str, dict[str, tuple[str, str]]] = {}
    for r in report.results:
        by_family.setdefault(r.family, {})[r.check] = (r.status, r.detail)
    assert list(by_family) == plugins.families_of(plugin)
    checked = 0
    for family, results in by_family.items():
        if list(results) == ["tiny"]:
            assert results["tiny"] == ("skipped", "no tiny checkpoint: skipped")
            continue
        checked += 1
        assert list(results) == CHECKS, family
        assert all(status == "pass" for check, (status, _) in results.items() if check != "packing"), family
        declared = Family(plugins, plugin, family).supports_packing()
        assert results["packing"] == (
            ("pass", results["packing"][1]) if declared else ("skipped", "packing: not declared")
        ), family
    assert checked >= 1


def test_unknown_plugin_is_a_one_line_error():
    res = famtune_cli("plugins", "check", "nosuch", check=False)
    assert res.returncode == 2
    assert res.stderr.startswith("famtune: error: no plugin named 'nosuch' is loaded (loaded: ")
    assert len(res.stderr.strip().splitlines()) == 1
    res = famtune_cli("plugins", "check", "qwen", "--family", "qwen9", check=False)
    assert res.returncode == 2 and "provides no family 'qwen9'; it provides qwen1, qwen2" in res.stderr


def test_packing_check_fails_a_family_whose_packed_samples_mix(tmp_path, monkeypatch):
    """A model that drops position ids attends across packed samples: declared packable, the strict
    check must fail it (the logits of every sample after the first in a row change)."""
    import types

    from transformers import LlamaForCausalLM

    import famtune
    from famtune.demo import demo_corpus
    from famtune.plugins import PluginSet
    from famtune.testing.conformance import _State
    from famtune.types import PluginInfo
    from famtune_internlm2 import convert
    from famtune_internlm2.family import InternLM2

    class NoPositions(LlamaForCausalLM):
        def forward(self, *args, position_ids=None, **kwargs):
            return super().forward(*args, **kwargs)

    class Leaky(InternLM2):
        name = "leaky"

        def load_model(self, path, load_kwargs):
            return NoPositions.from_pretrained(str(convert.native_cache_dir(path)), **load_kwargs)

    monkeypatch.setenv("FAMTUNE_CACHE", str(tmp_path / "cache"))
    leaky = types.ModuleType("leaky")
    leaky.famtune_register_families = famtune.hookimpl(lambda register: register(Leaky()))
    plugins = PluginSet()
    plugins.register(leaky, PluginInfo("leaky", "famtune-leaky", "0.1"))
    plugins._check_pending()
    family = Family(plugins, "leaky", "leaky")
    tiny = tmp_path / "tiny"
    assert family.tiny_checkpoint(str(tiny), demo_corpus()) and family.supports_packing()
    with pytest.raises(AssertionError, match="a packed sample's logits differ from the sample alone"):
        _State(family, tiny, tmp_path).packing()
