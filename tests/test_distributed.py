"""Data parallelism without processes: how batches are sharded over ranks, how the launcher calls
torchrun, and the errors a wrong launch gives. The multi-process runs are in test_distributed_e2e.py."""

from __future__ import annotations

import argparse

import pytest

from conftest import famtune_cli
from famtune import distributed, launch, packing
from famtune.errors import FamtuneError
from famtune.recipe import load_recipe
from famtune.train import epoch_batches


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return [i for b in epoch_batches(n, 3, seed, epoch) for i in b]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n,batch_size,grad_accum", [(17, 4, 1), (18, 4, 2), (5, 2, 1), (3, 1, 3), (1, 2, 1)])
def test_every_sample_is_trained_once_per_epoch_across_ranks(world, n, batch_size, grad_accum):
    order = _epoch_order(n, seed=7, epoch=1)
    ranks = [distributed.DataParallel(r, world) for r in range(world)]
    seen: list[int] = []
    pos = [0] * world
    steps = 0
    while pos[0] < n:
        groups = []
        for r, dp in enumerate(ranks):
            group, pos[r] = dp.step_batches(order, pos[r], batch_size, grad_accum)
            groups.append(group)
        assert len(set(pos)) == 1  # every rank advances to the same position
        assert len({len(g) for g in groups}) == 1  # and runs the same number of micro-batches
        for k in range(len(groups[0])):
            shares = [g[k] for g in groups]
            assert all(len(s.units) <= batch_size for s in shares)
            # one global micro-batch is the next world x batch_size samples, in order, split by rank
            assert [u for s in shares if s.real for u in s.units] == order[
                len(seen) : len(seen) + sum(len(s.units) for s in shares if s.real)
            ]
            seen += [u for s in shares if s.real for u in s.units]
            assert all(len(s.units) == 1 for s in shares if not s.real)  # a stand-in is one unlabelled unit
        steps += 1
    assert sorted(seen) == list(range(n)) and len(seen) == n
    assert steps == -(-ranks[0].global_micro_batches(n, batch_size) // grad_accum)


def test_n_processes_see_at_every_step_what_one_process_with_n_times_the_batch_sees():
    order = _epoch_order(40, seed=1, epoch=0)
    one = distributed.DataParallel(0, 1)
    pos1 = pos2 = 0
    while pos1 < len(order):
        (single,), pos1 = one.step_batches(order, pos1, 8, 1)
        shares = []
        for r in range(2):
            (share,), nxt = distributed.DataParallel(r, 2).step_batches(order, pos2, 4, 1)
            shares += share.units
        pos2 = nxt
        assert shares == single.units and pos1 == pos2


def test_packed_rows_shard_like_samples_and_keep_every_sample_once():
    lengths = [5, 9, 3, 12, 7, 7, 2, 15, 4, 8, 6, 11]
    rows = packing.epoch_rows(lengths, 16, seed=3, epoch=2)
    got = []
    for r in range(2):
        dp, pos = distributed.DataParallel(r, 2), 0
        while pos < len(rows):
            group, pos = dp.step_batches(rows, pos, 1, 1)
            got += [i for mb in group if mb.real for row in mb.units for i in row]
    assert sorted(got) == list(range(len(lengths)))


def test_a_data_position_resumes_in_any_world_size():
    order = _epoch_order(17, seed=0, epoch=0)
    _, after_two_steps = distributed.DataParallel(1, 2).step_batches(order, 0, 4, 2)
    assert after_two_steps == 16
    # the same position read by one process with twice the batch: the step that follows is the rest
    (rest,), end = distributed.DataParallel(0, 1).step_batches(order, after_two_steps, 8, 1)
    assert rest.units == order[16:] and end == 17


@pytest.mark.parametrize("n_batches,world", [(5, 2), (1, 2), (4, 4), (3, 1), (0, 2)])
def test_evaluation_batches_are_split_and_every_rank_runs_the_same_number(n_batches, world):
    per_rank = [distributed.DataParallel(r, world).eval_batches(n_batches) for r in range(world)]
    assert len({len(p) for p in per_rank}) == 1
    scored = sorted(k for p in per_rank for k in p if k is not None)
    assert scored == list(range(n_batches))


def test_split_evenly_gives_contiguous_balanced_shares():
    chunk = list("abcdefg")
    shares = [distributed.split_evenly(chunk, r, 3) for r in range(3)]
    assert shares == [list("abc"), list("de"), list("fg")]
    assert distributed.split_evenly(["x"], 1, 2) == []


def _train_args(*argv: str):
    p = argparse.ArgumentParser()
    p.add_argument("recipe")
    p.add_argument("--resume", nargs="?", const="latest")
    launch.add_arguments(p)
    return p.parse_known_args(list(argv))


def test_single_node_launch_uses_a_standalone_rendezvous_and_the_same_worker_command():
    args, extra = _train_args("r.yaml", "--nproc", "2", "--max-restarts", "3", "--resume", "--max_steps", "5")
    opts = launch.LaunchOptions.from_args(args)
    worker = launch.worker_args(args, extra)
    assert worker == ["train", "r.yaml", "--max_steps", "5", "--resume=latest"]
    argv = opts.torchrun_args(worker)
    assert argv[argv.index("--nproc-per-node") + 1] == "2" and argv[argv.index("--max-restarts") + 1] == "3"
    assert "--standalone" in argv and "--master-addr" not in argv
    assert argv[argv.index("--module") :] == ["--module", "famtune.cli", *worker]
    # torchrun itself accepts the command line famtune builds
    from torch.distributed.run import get_args_parser

    parsed = get_args_parser().parse_args(argv)
    assert parsed.module and parsed.training_script == "famtune.cli" and parsed.nproc_per_node == "2"


def test_multi_node_launch_uses_a_static_rendezvous_on_node_zero():
    args, _ = _train_args("r.yaml", "--nproc", "4", "--nnodes", "2", "--node-rank", "1", "--master", "10.1.2.3:29400")
    argv = launch.LaunchOptions.from_args(args).torchrun_args(["train", "r.yaml"])
    from torch.distributed.run import get_args_parser

    parsed = get_args_parser().parse_args(argv)
    assert (parsed.nnodes, parsed.node_rank, parsed.master_addr, parsed.master_port) == ("2", 1, "10.1.2.3", 29400)
    assert not parsed.standalone


def test_no_launch_options_means_one_process_in_this_one():
    args, _ = _train_args("r.yaml")
    assert launch.LaunchOptions.from_args(args) is None


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--nproc", "0"], "--nproc 0: expected at least 1"),
        (["--nproc", "2", "--nnodes", "2"], "needs --master ADDR:PORT"),
        (["--nproc", "2", "--nnodes", "2", "--node-rank", "2", "--master", "h:1"], "--node-rank 2: expected 0..1"),
        (["--nproc", "2", "--master", "nohost"], "expected ADDR:PORT"),
        (["--nproc", "2", "--max-restarts", "-1"], "--max-restarts -1"),
    ],
)
def test_wrong_launch_options_are_one_line_errors(argv, message):
    args, _ = _train_args("r.yaml", *argv)
    with pytest.raises(FamtuneError, match=message.replace("(", r"\(")):
        launch.LaunchOptions.from_args(args)


def test_a_worker_cannot_launch_again_and_does_not_merge(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    args, _ = _train_args("r.yaml", "--nproc", "2")
    with pytest.raises(FamtuneError, match="started by a launcher"):
        launch.LaunchOptions.from_args(args)
    with pytest.raises(FamtuneError, match="rank 1 of 2.*Run it directly: famtune merge"):
        distributed.refuse_when_sharded("merge")


def test_an_elastic_restart_resumes_from_the_last_complete_checkpoint(tmp_path, monkeypatch):
    assert distributed.resume_after_restart(None, str(tmp_path)) is None
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert distributed.resume_after_restart(None, str(tmp_path)) is None  # nothing saved yet: start over
    (tmp_path / "checkpoints" / "step-4.tmp").mkdir(parents=True)  # an incomplete save does not count
    assert distributed.resume_after_restart(None, str(tmp_path)) is None
    (tmp_path / "checkpoints" / "step-2").mkdir()
    (tmp_path / "checkpoints" / "step-2" / "trainer_state.json").write_text("{}")
    assert distributed.resume_after_restart(None, str(tmp_path)) == "latest"
    assert distributed.resume_after_restart("ckpt/step-1", str(tmp_path)) == "ckpt/step-1"


def test_distributed_timeout_must_be_positive(monkeypatch):
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(FamtuneError, match="FAMTUNE_DIST_TIMEOUT='soon'"):
        distributed.timeout_seconds()
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "90")
    assert distributed.timeout_seconds() == 90


def test_recipe_distributed_key_is_checked(tmp_path):
    assert load_recipe(None, {"model": "m", "data": "d"}).distributed == "ddp"
    with pytest.raises(FamtuneError, match="distributed is 'zero4'; expected ddp, fsdp, zero2, zero3"):
        load_recipe(None, {"model": "m", "data": "d", "distributed": "zero4"})


def test_cli_rejects_a_bad_launch_in_one_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: m\ndata: d\n")
    res = famtune_cli("train", recipe, "--nproc", "2", "--nnodes", "2", check=False)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "famtune: error: --nnodes 2 needs --master ADDR:PORT, the address of node 0 that every node can reach "
        "(the same on all nodes)"
    ]


@pytest.fixture
def restored_environ():
    import os

    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("preset,stage", [("zero2", 2), ("zero3", 3)])
def test_deepspeed_configs_are_complete_and_accepted_by_accelerates_plugin(preset, stage, restored_environ):
    from famtune import presets

    config = presets.deepspeed_config(
        preset, batch_size=4, grad_accum=2, world=8, max_grad_norm=1.0, compute_dtype_name="bfloat16"
    )
    assert config["train_batch_size"] == 64 and config["zero_optimization"]["stage"] == stage
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    assert "auto" not in repr(config)  # nothing left for DeepSpeed to guess
    assert config["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save", False) == (stage == 3)
    presets.check_deepspeed_config(config, world=8)  # accelerate's DeepSpeedPlugin reads it
    with pytest.raises(FamtuneError, match=r"train_batch_size 64 != 4 x 2 x 4 processes"):
        presets.check_deepspeed_config(config, world=4)
    broken = {**config, "fp16": {"enabled": True}}
    with pytest.raises(FamtuneError, match="bf16 and fp16 both enabled"):
        presets.check_deepspeed_config(broken, world=8)


def test_parameter_sharding_stores_4bit_weights_in_the_compute_dtype():
    from famtune import presets
    from famtune.quantization import nf4_config

    assert presets.nf4_settings("ddp", "bfloat16") == nf4_config("bfloat16")
    assert presets.nf4_settings("zero2", "bfloat16")["bnb_4bit_quant_storage"] == "uint8"
    for preset in ("fsdp", "zero3"):
        settings = presets.nf4_settings(preset, "bfloat16")
        assert settings == {**nf4_config("bfloat16"), "bnb_4bit_quant_storage": "bfloat16"}
    # and bitsandbytes accepts it as a config
    assert str(presets.bitsandbytes_storage(settings)) == "torch.bfloat16"


def test_fsdp_preset_builds_an_fsdp2_plugin_with_cpu_ram_efficient_loading(restored_environ):
    from famtune import presets

    plugin = presets.accelerate_plugins("fsdp")["fsdp_plugin"]
    assert plugin.fsdp_version == 2 and plugin.cpu_ram_efficient_loading is True
    assert plugin.reshard_after_forward is True and plugin.use_orig_params is None  # FSDP2 keeps originals
    assert presets.accelerate_plugins("ddp") == {}


def test_zero_presets_without_deepspeed_stop_in_one_line():
    import importlib.util

    from famtune import presets

    assert importlib.util.find_spec("deepspeed") is None  # famtune does not depend on it
    with pytest.raises(FamtuneError, match="zero3 needs DeepSpeed, which is not installed; pip install deepspeed"):
        presets.accelerate_plugins("zero3")


def test_estimate_per_device_under_each_preset(tmp_path):
    import dataclasses

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from famtune.estimate import estimate_recipe, per_device
    from famtune.recipe import Recipe

    config = Qwen2Config(
        vocab_size=1000,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "m")
    recipe = dataclasses.replace(
        Recipe(), model=str(tmp_path / "m"), data="unused", lora_targets="all-linear", max_length=64, batch_size=2
    )
    one = estimate_recipe(recipe)
    assert per_device(one, "zero3", 1) is one
    est = {p: per_device(one, p, 4) for p in ("ddp", "zero2", "zero3", "fsdp")}
    layer = one.weights / 4
    assert est["ddp"].weights == one.weights and est["ddp"].gradients > one.gradients
    assert est["zero2"].weights == one.weights and est["zero2"].optimizer == one.optimizer / 4
    assert est["zero3"].weights == pytest.approx(one.weights / 4 + layer)
    assert est["fsdp"].weights == pytest.approx(one.weights / 4 + 2 * layer)
    assert est["zero3"].optimizer == est["fsdp"].optimizer == one.optimizer / 4
    assert all(e.activations == one.activations for e in est.values())  # per-device batch: unchanged
    assert est["zero3"].total < est["zero2"].total < est["ddp"].total
    with pytest.raises(FamtuneError, match="--nproc 0"):
        per_device(one, "ddp", 0)
    (tmp_path / "r.yaml").write_text(f"model: {tmp_path / 'm'}\ndistributed: zero3\n")
    res = famtune_cli("estimate", tmp_path / "r.yaml", "--nproc", "4")
    assert "per device: zero3 on 4 processes: weights, LoRA, gradients and optimizer state split" in res.stdout


def test_a_failed_launch_blames_the_killed_worker_not_the_ones_that_lost_their_peer():
    import signal

    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    lost_peer = ProcessFailure(local_rank=0, pid=10, exitcode=1, error_file="")
    stopped = ProcessFailure(local_rank=2, pid=12, exitcode=-signal.SIGTERM, error_file="")
    killed = ProcessFailure(local_rank=1, pid=11, exitcode=-signal.SIGKILL, error_file="")
    ordered = sorted({0: lost_peer, 1: killed, 2: stopped}.items(), key=launch._root_cause_first)
    assert ordered[0][0] == 1
    assert launch._how(killed) == "signal SIGKILL" and launch._how(lost_peer) == "exit code 1"
