"""famtune.merge: a QLoRA adapter folded into its base loads in plain transformers and behaves like
base+adapter, with famtune's chat template, stop ids and sampling defaults.

The base is a tiny random-weight Qwen2.5 checkpoint written by the installed Qwen plugin; the
adapter is real LoRA (non-zero from the start, then briefly trained) on the NF4-quantized base.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import ADAPTER_ANSWERS, ADAPTER_FAMILY, build_base_and_adapter
from famtune.checkpoint import open_checkpoint
from famtune.errors import FamtuneError
from famtune.merge import merge
from famtune.metadata import build_metadata, read_metadata, write_metadata

FAMILY = ADAPTER_FAMILY
TRAIN = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in ADAPTER_ANSWERS.items()]
PROMPTS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a robot."}, {"role": "user", "content": "Tell me a story"}],
]


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    yield


def nf4_with_adapter(base: Path, adapter: Path, family: str = FAMILY):
    """The reference: PeftModel on the NF4 base, computing in fp32 as training did."""
    import bitsandbytes as bnb
    from peft import PeftModel

    model = open_checkpoint(str(base), family=family).load_model(quantization="nf4", compute_dtype="fp32")
    for module in model.modules():
        # Otherwise bitsandbytes switches to bf16 kernels at inference on CPUs with AVX512-BF16.
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return PeftModel.from_pretrained(model, str(adapter)).eval()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    family, base, adapter = build_base_and_adapter(root)
    out = root / "merged"
    lines: list[str] = []
    report = merge(str(adapter), str(out), log=lines.append)
    return {"family": family, "base": base, "adapter": adapter, "out": out, "report": report, "log": lines}


def prompt_ids(family, tokenizer, messages):
    return family.encode(tokenizer, messages, masking="all_assistant", add_generation_prompt=True).input_ids


def test_merged_model_matches_base_plus_adapter_in_plain_transformers(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    family, out = built["family"], built["out"]
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    reference = nf4_with_adapter(built["base"], built["adapter"])
    plain_base = AutoModelForCausalLM.from_pretrained(built["base"]).eval()
    stops = read_metadata(built["adapter"])["stop_ids"]
    worst, base_gap, scale = 0.0, 0.0, 1.0
    for messages in PROMPTS:
        ids = torch.tensor([prompt_ids(family, tokenizer, messages)])
        with torch.no_grad():
            got = merged(input_ids=ids).logits
            want = reference(input_ids=ids).logits
            worst = max(worst, (got - want).abs().max().item())
            scale = max(scale, want.abs().max().item())
            base_gap = max(base_gap, (plain_base(input_ids=ids).logits - want).abs().max().item())
            kwargs = dict(max_new_tokens=12, do_sample=False, eos_token_id=stops, pad_token_id=stops[0])
            assert (
                merged.generate(input_ids=ids, **kwargs).tolist()
                == reference.generate(input_ids=ids, **kwargs).tolist()
            )
    # Measured: up to 1.2e-6 of the largest logit (3.7e-5 on logits of ~30): fp32 rounding of W + BA
    # versus W and BA applied separately. bitsandbytes' default bf16 CPU inference would differ by
    # ~1e-4 of the largest logit, hence the fp32 reference.
    assert worst < 1e-5 * scale, (worst, scale)
    assert base_gap > 1e-2, "the adapter changed nothing; the comparison would prove nothing"


def test_trained_answer_survives_the_merge(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    family, out = built["family"], built["out"]
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([prompt_ids(family, tokenizer, TRAIN[0][:1])])
    # generation_config.json alone must make generate stop at the end of the turn.
    new = merged.generate(input_ids=ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1] :].tolist()
    assert tokenizer.decode(new) == TRAIN[0][1]["content"] + "<|im_end|>"


def test_generation_config_chat_template_and_metadata(built):
    from transformers import AutoTokenizer, GenerationConfig

    family, out = built["family"], built["out"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    base_tokenizer = open_checkpoint(str(built["base"]), family=FAMILY).load_tokenizer()
    defaults = family.generation_defaults(base_tokenizer)
    gen = GenerationConfig.from_pretrained(out)
    assert (
        gen.eos_token_id
        == list(defaults.stop_ids)
        == [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    )
    for key, value in defaults.sampling.items():
        assert getattr(gen, key) == value
    conversations = PROMPTS + [TRAIN[0] + [{"role": "user", "content": "and you?"}]]
    for messages in conversations:
        got = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        assert got == prompt_ids(family, base_tokenizer, messages)
    for messages in TRAIN:
        got = tokenizer.apply_chat_template(messages, return_dict=False)
        assert got == family.encode(base_tokenizer, messages, masking="all_assistant").input_ids
    meta = json.loads((out / "famtune.json").read_text())
    assert meta == {**read_metadata(built["adapter"]), "merged": True}
    assert built["report"]["shards"] == 1 and (out / "model.safetensors").exists()


def test_small_shards_write_an_index_and_no_pickles(built, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sharded"
    report = merge(str(built["adapter"]), str(out), max_shard_size="100KB", log=lambda _: None)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) >= 2 and report["shards"] == len(shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt*"))
    whole = load_file(built["out"] / "model.safetensors")
    parts = {k: v for p in shards for k, v in load_file(p).items()}
    assert parts.keys() == whole.keys() and all(torch.equal(parts[k], whole[k]) for k in whole)
    AutoModelForCausalLM.from_pretrained(out)


def test_output_dtype_follows_the_request(built, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "bf16"
    report = merge(str(built["adapter"]), str(out), dtype="bf16", log=lambda _: None)
    assert report["dtype"] == "bfloat16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}


def test_original_precision_reports_the_nf4_gap(built, tmp_path):
    from safetensors.torch import load_file

    lines: list[str] = []
    out = tmp_path / "original"
    report = merge(str(built["adapter"]), str(out), base_precision="original", log=lines.append)
    gap = report["max_abs_weight_diff"]
    assert gap > 0 and any(f"{gap:.4g}" in line for line in lines)
    # Both merges add the same LoRA delta, so they differ exactly by original minus dequantized NF4.
    trained, original = load_file(built["out"] / "model.safetensors"), load_file(out / "model.safetensors")
    quantized = [k for k in trained if k.endswith("proj.weight")]
    measured = max((original[k] - trained[k]).abs().max().item() for k in quantized)
    assert measured == pytest.approx(gap, rel=1e-3)
    assert all(torch.equal(original[k], trained[k]) for k in trained if "norm" in k or "embed" in k or "lm_head" in k)


def test_layout_original_needs_plugin_support(built, tmp_path):
    with pytest.raises(FamtuneError) as err:
        merge(str(built["adapter"]), str(tmp_path / "orig"), layout="original", log=lambda _: None)
    assert "\n" not in str(err.value) and "'qwen2.5'" in str(err.value)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"max_shard_size": "lots"}, "'lots'"),
        ({"base_precision": "fp64"}, "'fp64'"),
        ({"layout": "gguf"}, "'gguf'"),
    ],
)
def test_bad_options_are_one_line_errors(built, tmp_path, kwargs, words):
    with pytest.raises(FamtuneError) as err:
        merge(str(built["adapter"]), str(tmp_path / "x"), log=lambda _: None, **kwargs)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "x").exists()


def test_refuses_to_write_over_the_adapter(built):
    with pytest.raises(FamtuneError, match="adapter directory"):
        merge(str(built["adapter"]), str(built["adapter"]), log=lambda _: None)


REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "reference" / "qwen1"


def test_layout_original_round_trips_through_the_plugin(tmp_path, monkeypatch):
    """Qwen1 has an original layout: the merge is written in it, with the base's tokenizer files."""
    import shutil

    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open

    monkeypatch.setenv("FAMTUNE_CACHE", str(tmp_path / "cache"))  # the plugin's native-layout cache
    base, adapter, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    base.mkdir()
    for src in [*(REFERENCE / "tiny").iterdir(), *(REFERENCE / "tokenizer").iterdir()]:
        shutil.copyfile(src, base / src.name)
    ckpt = open_checkpoint(str(base))
    family, tokenizer = ckpt.family, ckpt.load_tokenizer()
    assert family.name == "qwen1"
    torch.manual_seed(0)
    model = ckpt.load_model(quantization="nf4", compute_dtype="fp32")
    config = LoraConfig(r=4, init_lora_weights=False, target_modules=family.lora_target_modules(model, "default"))
    get_peft_model(model, config).save_pretrained(str(adapter))
    write_metadata(
        adapter,
        build_metadata(
            family=family,
            template_name=family.conversation_template().name,
            generation=family.generation_defaults(tokenizer),
            base_model=str(base),
            base_path=str(base),
            quantization="nf4",
            compute_dtype="fp32",
            masking="all_assistant",
            max_length=256,
            system=None,
        ),
    )

    merge(str(adapter), str(out), layout="original", log=lambda _: None)
    written = json.loads((out / "config.json").read_text())
    assert written["auto_map"] == json.loads((base / "config.json").read_text())["auto_map"]
    with safe_open(base / "model.safetensors", "pt") as a, safe_open(out / "model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys())
    assert (out / "qwen.tiktoken").read_bytes() == (base / "qwen.tiktoken").read_bytes()
    meta = read_metadata(adapter)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == meta["stop_ids"]
    assert read_metadata(out) == {**meta, "merged": True}
    # Loaded back through the plugin, the merged original layout computes what base+adapter did.
    ids = torch.tensor([[5, 17, 300, 42, 999, 3, 64]])
    with torch.no_grad():
        got = open_checkpoint(str(out)).load_model(compute_dtype="fp32")(input_ids=ids).logits
        want = nf4_with_adapter(base, adapter, family="qwen1")(input_ids=ids).logits
    assert (got - want).abs().max().item() < 1e-5
