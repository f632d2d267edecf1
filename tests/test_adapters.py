"""famtune.adapters: recipe keys and their checks, AdaLoRA's schedule and real rank allocation,
LoRA+'s optimizer groups, the bundled Baichuan2 AdaLoRA recipe and the memory estimate per method."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import test_estimate
import yaml

from conftest import ROOT, build_tiny, famtune_cli
from famtune.adapters import adalora_schedule, validate_adapter_recipe
from famtune.demo import DEMO_DIR
from famtune.errors import FamtuneError
from famtune.recipe import Recipe, load_recipe

EXAMPLE = ROOT / "examples" / "recipes" / "baichuan2-adalora.yaml"


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    yield


def recipe_file(tmp_path: Path, **keys) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "data": "d.jsonl", **keys}))
    return path


@pytest.mark.parametrize(
    "keys, words",
    [
        ({"adapter": "qlora"}, ["adapter is 'qlora'", "lora, adalora, dora"]),
        ({"lora_init": "svd"}, ["lora_init is 'svd'", "pissa"]),
        ({"loraplus_lr_ratio": 0.5}, ["loraplus_lr_ratio is 0.5", ">= 1"]),
        ({"lora_init": "loftq", "quantization": "none"}, ["loftq", "quantization: nf4"]),
        ({"adapter": "adalora", "rslora": True}, ["rslora", "adalora"]),
        ({"adapter": "adalora", "lora_init": "pissa"}, ["lora_init: pissa", "adalora"]),
        ({"adapter": "adalora", "lora_r": 8, "adalora_target_r": 9}, ["adalora_target_r is 9", "1..lora_r (8)"]),
        ({"adapter": "dora", "lora_init": "olora"}, ["olora", "dora"]),
        ({"adalora_target_r": 4}, ["adalora_target_r is set", "adapter: adalora"]),
    ],
)
def test_bad_adapter_keys_are_one_line_errors_naming_the_file(tmp_path, keys, words):
    path = recipe_file(tmp_path, **keys)
    with pytest.raises(FamtuneError) as err:
        load_recipe(str(path))
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path))
    for word in words:
        assert word in message, message


def test_cli_reports_a_bad_adapter_without_traceback(tmp_path):
    res = famtune_cli("train", recipe_file(tmp_path, adapter="lokr"), check=False)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("famtune: error:") and "lokr" in res.stderr


def test_defaults_are_plain_lora():
    r = Recipe(model="m", data="d")
    validate_adapter_recipe(r)
    assert (r.adapter, r.rslora, r.lora_init, r.loraplus_lr_ratio) == ("lora", False, "default", 0.0)


@pytest.mark.parametrize("steps", [2, 3, 5, 10, 37, 100, 1000, 12345])
def test_adalora_schedule_has_every_phase_and_peft_accepts_it(steps):
    from peft import AdaLoraConfig

    s = adalora_schedule(steps)
    AdaLoraConfig(init_r=8, target_r=4, target_modules=["q"], **s)  # PEFT validates the phases
    assert s["total_step"] == steps
    final = steps - s["tfinal"]
    assert s["tinit"] < final <= steps - 1, "the final allocation must happen on a real step"
    assert 1 <= s["deltaT"] <= max(1, final - s["tinit"])


def test_adalora_needs_two_steps():
    with pytest.raises(FamtuneError, match="at least 2 optimizer steps"):
        adalora_schedule(1)


def test_bundled_baichuan2_adalora_recipe_loads_and_validates():
    recipe = load_recipe(str(EXAMPLE))
    assert recipe.adapter == "adalora" and recipe.quantization == "nf4"
    assert recipe.lora_r == 12 and recipe.adalora_target_r == 8 and recipe.family == "baichuan2-7b"
    assert not recipe.trust_remote_code


@pytest.mark.parametrize("adapter, lora_init", [("dora", "default"), ("adalora", "default"), ("lora", "pissa")])
def test_estimate_adds_each_methods_memory(tmp_path, adapter, lora_init):
    from famtune.estimate import estimate_recipe

    model = test_estimate.qwen2_dir(tmp_path / "m", 256, 688, 2, 3000)
    plain = estimate_recipe(load_recipe(None, {"model": str(model), "data": "d", "max_length": 256}))
    other = estimate_recipe(
        load_recipe(
            None, {"model": str(model), "data": "d", "max_length": 256, "adapter": adapter, "lora_init": lora_init}
        )
    )
    p, o = plain.details, other.details
    if adapter == "dora":  # one magnitude value per output feature of each target
        assert o["lora_params"] - p["lora_params"] == sum(m.out_features for n, m in _targets(model))
        assert other.activations > plain.activations
    elif adapter == "adalora":  # E (r per target), and three allocator copies of every adapter value
        assert o["lora_params"] - p["lora_params"] == 8 * p["lora_modules"]
        assert other.optimizer - plain.optimizer == pytest.approx(
            o["lora_params"] * 8 + o["lora_params"] * 12 - p["lora_params"] * 8
        )
    else:
        assert other.total == plain.total and o["init_peak"] > other.weights
    assert o["method_note"] and not p["method_note"]
    assert any(adapter in line or lora_init in line for line in other.lines())


def _targets(model_dir: Path):
    import torch

    from famtune.checkpoint import open_checkpoint
    from famtune.estimate import meta_model

    ckpt = open_checkpoint(str(model_dir))
    model = meta_model(ckpt, torch.bfloat16)
    names = ckpt.family.lora_target_modules(model, "default")
    return [
        (n, m)
        for n, m in model.named_modules()
        if any(n.endswith("." + t) for t in names) and hasattr(m, "out_features")
    ]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny("qwen2.5", tmp_path_factory.mktemp("tiny-adapters"))


def run(tiny: Path, out: Path, resume=None, **keys) -> dict:
    from famtune.train import train

    settings = dict(
        model=str(tiny),
        data=str(DEMO_DIR / "identity.jsonl"),
        output_dir=str(out),
        progress=False,
        max_length=128,
        batch_size=2,
        evaluation_inputs=[],
        compute_dtype="fp32",
        lora_dropout=0.0,
        learning_rate=0.02,
        lora_targets="all-linear",
    )
    settings.update(keys)
    logs: list[str] = []
    summary = train(load_recipe(None, settings), resume=resume, log=logs.append)
    summary["log"] = logs
    return summary


@pytest.mark.slow
def test_adalora_prunes_to_target_rank_on_average_unevenly_and_peft_reloads_it(tiny, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from famtune.train import Trainer

    recipe = load_recipe(
        None,
        dict(
            model=str(tiny),
            data=str(DEMO_DIR / "identity.jsonl"),
            output_dir=str(tmp_path / "out"),
            progress=False,
            max_length=128,
            batch_size=2,
            evaluation_inputs=[],
            compute_dtype="fp32",
            lora_dropout=0.0,
            learning_rate=0.02,
            lora_targets="all-linear",
            adapter="adalora",
            lora_r=8,
            adalora_target_r=4,
            max_steps=12,
            quantization="none",
        ),
    )
    trainer = Trainer(recipe, log=lambda *a: None)
    trainer.run()
    trained = trainer.accelerator.unwrap_model(trainer.model).eval()
    acfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (acfg["init_r"], acfg["target_r"]) == (8, 4)
    assert {k: acfg[k] for k in ("tinit", "tfinal", "deltaT", "total_step")} == adalora_schedule(12)
    ranks = {k: sum(v) for k, v in acfg["rank_pattern"].items()}
    assert len(ranks) == 14  # 7 projections x 2 layers
    assert sum(ranks.values()) / len(ranks) == pytest.approx(4, abs=0.5)  # the budget shrank from 8 to 4
    assert len(set(ranks.values())) > 1, ranks  # and was shared out unevenly
    meta = json.loads((tmp_path / "out" / "famtune.json").read_text())
    assert meta["adapter"]["ranks"] == ranks
    # PEFT rebuilds each module at its final rank from the saved pattern
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), tmp_path / "out").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():  # the pruned, reloaded adapter computes what the trained one did
        want, got = trained(input_ids=ids).logits, model(input_ids=ids).logits
    assert (got - want).abs().max().item() < 1e-5 * max(1.0, want.abs().max().item())
    for name, param in model.named_parameters():
        if "lora_E" in name:
            key = name.replace("base_model.model.", "").replace(".default", "")
            assert param.shape[0] == ranks[key], name
            assert torch.count_nonzero(param) == ranks[key]  # a kept singular value is not a masked zero


@pytest.mark.slow
def test_adalora_orthogonal_regulariser_reaches_the_gradients(tiny, tmp_path):
    """famtune's loss passes no labels; AdaLoRA's orthogonal regulariser (PEFT's, added to a model
    output's loss) must still be computed in training forwards and reach A and B."""
    from famtune.adapters import AdapterRun

    logs: list[str] = []
    r = load_recipe(None, {"model": str(tiny), "data": "d", "adapter": "adalora", "output_dir": str(tmp_path)})
    adapters = AdapterRun(r, 4, tmp_path, logs.append)
    import torch

    from famtune.checkpoint import open_checkpoint

    model = open_checkpoint(str(tiny)).load_model("none", "fp32")
    model = adapters.attach(model, ["q_proj", "v_proj"], quantized=False)
    model.train()
    ids = torch.tensor([[1, 2, 3, 4]])
    model(input_ids=ids)
    reg = adapters.take_regulariser()
    assert reg is not None and reg.requires_grad and float(reg) > 0
    reg.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_A" in n)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert adapters.take_regulariser() is None  # evaluation adds nothing


@pytest.mark.slow
def test_loraplus_groups_are_recorded_and_a_changed_ratio_refuses_to_resume(tiny, tmp_path):
    summary = run(tiny, tmp_path / "a", loraplus_lr_ratio=8, max_steps=3, save_steps=2)
    assert any("LoRA+: optimizer groups" in line for line in summary["log"])
    state = json.loads((tmp_path / "a" / "checkpoints" / "step-2" / "adapter_state.json").read_text())
    groups = {g["group"]: g for g in state["optimizer_groups"]}
    assert groups["B"]["lr"] == pytest.approx(8 * groups["A"]["lr"])
    assert groups["A"]["params"] and all("lora_A" in n for n in groups["A"]["params"])
    assert groups["B"]["params"] and all("lora_B" in n for n in groups["B"]["params"])
    optimizer = __import__("torch").load(tmp_path / "a" / "checkpoints" / "step-2" / "optimizer.pt", weights_only=True)
    assert [len(g["params"]) for g in optimizer["param_groups"]] == [
        len(g["params"]) for g in state["optimizer_groups"]
    ]
    shutil.copytree(tmp_path / "a" / "checkpoints", tmp_path / "b" / "checkpoints")
    with pytest.raises(FamtuneError, match="loraplus_lr_ratio 8.0") as err:
        run(tiny, tmp_path / "b", resume=True, loraplus_lr_ratio=4, max_steps=3, save_steps=2)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_loftq_runs_where_peft_can_compute_it(tiny, tmp_path):
    import torch

    if torch.cuda.is_available():
        run(tiny, tmp_path / "out", lora_init="loftq", max_steps=2)
        assert json.loads((tmp_path / "out" / "famtune.json").read_text())["adapter"]["init"] == "loftq"
    else:  # peft 0.21's LoftQ computes on CUDA/XPU only: a one-line error, not a traceback
        with pytest.raises(FamtuneError, match="CUDA or XPU") as err:
            run(tiny, tmp_path / "out", lora_init="loftq", max_steps=2)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("entry", ["replace_lora_weights_loftq", "LoftQConfig"])
def test_peft_computes_loftq_on_cuda_only_which_is_why_famtune_refuses_it_on_cpu(tiny, entry):
    """Both of PEFT's LoftQ entry points move the weight to a hard-coded CUDA/XPU device (peft 0.21.2,
    utils/loftq_utils.py lines 70-72 and 112-115). When a PEFT upgrade computes LoftQ on CPU this
    fails: then drop famtune's CPU guard in AdapterRun.attach and add LoftQ to the adapter matrix."""
    import torch
    from peft import LoftQConfig, LoraConfig, get_peft_model, replace_lora_weights_loftq

    from famtune.checkpoint import open_checkpoint

    ckpt = open_checkpoint(str(tiny))

    def loftq() -> None:
        if entry == "replace_lora_weights_loftq":  # on an already-quantized NF4 model
            model = get_peft_model(
                ckpt.load_model(quantization="nf4", compute_dtype="fp32"),
                LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"),
            )
            replace_lora_weights_loftq(model, model_path=str(tiny))
        else:  # PEFT quantizes a full-precision weight itself
            get_peft_model(
                ckpt.load_model(quantization="none", compute_dtype="fp32"),
                LoraConfig(
                    r=4,
                    target_modules=["q_proj"],
                    init_lora_weights="loftq",
                    loftq_config=LoftQConfig(loftq_bits=4),
                    task_type="CAUSAL_LM",
                ),
            )

    if torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()):
        loftq()  # where famtune's guard lets LoftQ through, PEFT computes it
    else:
        with pytest.raises((AssertionError, RuntimeError), match="(?i)cuda|xpu"):
            loftq()


@pytest.mark.slow
def test_bundled_baichuan2_recipe_runs_on_a_tiny_baichuan2(tmp_path):
    from famtune.train import train

    tiny = build_tiny("baichuan2-7b", tmp_path / "tiny")
    recipe = load_recipe(
        str(EXAMPLE),
        {
            "model": str(tiny),
            "data": str(DEMO_DIR / "identity.jsonl"),
            "output_dir": str(tmp_path / "out"),
            "max_steps": 4,
            "max_length": 128,
            "progress": False,
            "evaluation_inputs": [],
            "compute_dtype": "fp32",
            "grad_accum": 1,
        },
    )
    train(recipe, log=lambda *a: None)
    acfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert acfg["peft_type"] == "ADALORA" and (acfg["init_r"], acfg["target_r"]) == (12, 8)
    ranks = [sum(v) for v in acfg["rank_pattern"].values()]
    assert sum(ranks) / len(ranks) == pytest.approx(8, abs=0.5)


def test_unknown_method_in_compare_is_a_one_line_error(tmp_path):
    recipe = tmp_path / "c.yaml"
    recipe.write_text(yaml.safe_dump({"models": ["tiny:qwen2.5"], "data": str(DEMO_DIR / "identity.jsonl")}))
    res = famtune_cli("compare", recipe, "--adapters", "lora,lokr", "--output", tmp_path / "out", check=False)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "'lokr' is not one of" in res.stderr and "dora" in res.stderr
    res = famtune_cli(
        "compare",
        recipe,
        "--adapters",
        "lora+loftq",
        "--quantization",
        "none",
        "--output",
        tmp_path / "out",
        check=False,
    )
    assert res.returncode != 0 and "adapter method 'lora+loftq'" in res.stderr and "nf4" in res.stderr


@pytest.mark.slow
def test_compare_trains_one_model_once_per_adapter_method(tmp_path):
    recipe = tmp_path / "c.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "models": ["tiny:qwen2.5"],
                "adapters": ["lora", "adalora"],
                "data": str(DEMO_DIR / "identity.jsonl"),
                "quantization": "nf4",
                "compute_dtype": "fp32",
                "max_length": 128,
                "lora_r": 8,
                "lora_targets": "all-linear",
                "learning_rate": 0.01,
                "batch_size": 6,
                "max_steps": 3,
                "evaluation_inputs": [],
                "progress": False,
            }
        )
    )
    out = tmp_path / "out"
    famtune_cli("compare", recipe, "--output", out, env={"FAMTUNE_CACHE": str(tmp_path / "cache")})
    rows = json.loads((out / "report" / "results.json").read_text())["models"]
    assert [r["model"] for r in rows] == ["tiny:qwen2.5 [lora]", "tiny:qwen2.5 [adalora]"]
    assert all(r["status"] == "ok" for r in rows)
    methods = [json.loads(Path(r["dir"], "famtune.json").read_text())["adapter"]["method"] for r in rows]
    assert methods == ["lora", "adalora"]
    trainable = [r["trainable_parameters"] for r in rows]
    assert trainable[1] == trainable[0] + 8 * 14  # AdaLoRA adds r singular values per target
    assert "tiny:qwen2.5 [adalora]" in (out / "report" / "report.md").read_text()
