"""Streaming merge: tensor by tensor, bit-identical to loading the whole model and merging with PEFT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from famtune.checkpoint import model_load_kwargs, open_checkpoint
from famtune.merge import merge
from famtune.merge_stream import nf4_module_names
from famtune.metadata import build_metadata, write_metadata
from famtune.plugins import get_plugins

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "reference" / "qwen1"
CORPUS = ["hello there, how are you today?", "The quick brown fox jumps over the lazy dog."] * 10


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    yield


def make_adapter(base: Path, adapter: Path, family_name: str | None = None, **lora):
    """A non-zero (random) LoRA adapter on the NF4 base, with the famtune.json training writes."""
    from peft import LoraConfig, get_peft_model

    ckpt = open_checkpoint(str(base), family=family_name)
    torch.manual_seed(0)
    model = ckpt.load_model(quantization="nf4", compute_dtype="fp32")
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
        target_modules=ckpt.family.lora_target_modules(model, "all-linear"),
        **lora,
    )
    get_peft_model(model, config).save_pretrained(str(adapter))
    tokenizer = ckpt.load_tokenizer()
    write_metadata(
        adapter,
        build_metadata(
            family=ckpt.family,
            template_name=ckpt.family.conversation_template().name,
            generation=ckpt.family.generation_defaults(tokenizer),
            base_model=str(base),
            base_path=str(base),
            quantization="nf4",
            compute_dtype="fp32",
            masking="all_assistant",
            max_length=256,
            system=None,
        ),
    )
    return ckpt


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    fam = get_plugins().claim({}, "", family="qwen2.5")
    assert fam.tiny_checkpoint(str(root / "base"), CORPUS)
    ckpt = make_adapter(root / "base", root / "adapter")
    return {"root": root, "ckpt": ckpt, "adapter": root / "adapter"}


def both_ways(adapter: Path, out: Path, **kwargs):
    logs: dict[str, list[str]] = {"stream": [], "memory": []}
    streamed = merge(str(adapter), str(out / "stream"), log=logs["stream"].append, **kwargs)
    in_memory = merge(str(adapter), str(out / "memory"), stream=False, log=logs["memory"].append, **kwargs)
    return streamed, in_memory, logs


def assert_same_weights(a: Path, b: Path):
    ta = {k: v for p in sorted(a.glob("*.safetensors")) for k, v in load_file(p).items()}
    tb = {k: v for p in sorted(b.glob("*.safetensors")) for k, v in load_file(p).items()}
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


@pytest.mark.parametrize("kwargs", [{}, {"dtype": "bf16"}, {"base_precision": "original"}])
def test_streamed_merge_is_bit_identical_to_the_in_memory_merge(qwen, tmp_path, kwargs):
    streamed, in_memory, logs = both_ways(qwen["adapter"], tmp_path, **kwargs)
    assert streamed.get("streamed") and "streamed" not in in_memory
    assert any("streaming the merge" in line for line in logs["stream"])
    assert_same_weights(tmp_path / "stream", tmp_path / "memory")
    assert streamed["base_precision"] == in_memory["base_precision"]
    if "max_abs_weight_diff" in in_memory:
        assert streamed["max_abs_weight_diff"] == pytest.approx(in_memory["max_abs_weight_diff"], rel=1e-6)
    cfg_s, cfg_m = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("stream", "memory"))
    assert cfg_s["dtype"] == cfg_m["dtype"] and "quantization_config" not in cfg_s
    for name in ("generation_config.json", "famtune.json", "tokenizer_config.json"):
        assert (tmp_path / "stream" / name).read_text() == (tmp_path / "memory" / name).read_text()


def test_small_shards_stream_into_an_index(qwen, tmp_path):
    from transformers import AutoModelForCausalLM

    report = merge(str(qwen["adapter"]), str(tmp_path / "s"), max_shard_size="100KB", log=lambda _: None)
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    assert report["shards"] >= 2 and set(index["weight_map"].values()) == {
        p.name for p in (tmp_path / "s").glob("*.safetensors")
    }
    merge(str(qwen["adapter"]), str(tmp_path / "one"), log=lambda _: None)
    assert_same_weights(tmp_path / "s", tmp_path / "one")
    AutoModelForCausalLM.from_pretrained(tmp_path / "s")


def test_quantized_set_from_the_meta_model_is_what_transformers_quantizes(qwen):
    import bitsandbytes as bnb
    from accelerate import init_empty_weights
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit
    from transformers import AutoConfig, AutoModelForCausalLM

    ckpt = qwen["ckpt"]
    loaded = ckpt.load_model(quantization="nf4", compute_dtype="fp32")
    real = {n: m for n, m in loaded.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    with init_empty_weights():
        meta_model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt.path))
    qconf = model_load_kwargs("nf4", "fp32", device=torch.device("cpu"))["quantization_config"]
    assert nf4_module_names(meta_model, qconf) == set(real) and "lm_head" not in real
    # quantize_4bit/dequantize_4bit on one tensor reproduces what loading with BitsAndBytesConfig gives
    raw = load_file(Path(ckpt.path) / "model.safetensors")
    for name, module in real.items():
        packed, state = quantize_4bit(
            raw[f"{name}.weight"].float(),
            blocksize=64,
            compress_statistics=True,
            quant_type="nf4",
            quant_storage=torch.uint8,
        )
        assert torch.equal(packed, module.weight.data)
        assert torch.equal(
            dequantize_4bit(packed, state), dequantize_4bit(module.weight.data, module.weight.quant_state)
        )


def test_unusual_adapters_fall_back_and_say_so(qwen, tmp_path):
    make_adapter(qwen["root"] / "base", tmp_path / "adapter", bias="lora_only")
    lines: list[str] = []
    report = merge(str(tmp_path / "adapter"), str(tmp_path / "out"), log=lines.append)
    assert "streamed" not in report and any("cannot stream" in line for line in lines)


def test_original_layout_streams_from_the_plugins_native_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FAMTUNE_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "base"
    base.mkdir()
    for src in [*(REFERENCE / "tiny").iterdir(), *(REFERENCE / "tokenizer").iterdir()]:
        shutil.copyfile(src, base / src.name)
    assert make_adapter(base, tmp_path / "adapter").family.name == "qwen1"
    streamed, _, logs = both_ways(tmp_path / "adapter", tmp_path, layout="original")
    assert streamed.get("streamed")
    line = next(x for x in logs["stream"] if "streaming the merge" in x)
    assert str(tmp_path / "cache") in line  # the converted native checkpoint, not the original files
    assert_same_weights(tmp_path / "stream", tmp_path / "memory")
