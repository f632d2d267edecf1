"""Loading errors a new user meets: hubs out of reach, a file for a directory, a tokenizer from another model."""

from __future__ import annotations

import socket
import time

import pytest

from conftest import famtune_cli


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is: connecting is refused


@pytest.mark.parametrize(
    "spec,env",
    [
        ("Org/Name", {"HF_ENDPOINT": "https://famtune-no-such-host.invalid"}),
        ("Org/Name", {"HF_ENDPOINT": "http://127.0.0.1:{port}"}),
        ("modelscope:Org/Name", {"MODELSCOPE_DOMAIN": "famtune-no-such-host.invalid"}),
        ("modelscope:Org/Name", {"MODELSCOPE_DOMAIN": "http://127.0.0.1:{port}"}),
    ],
)
def test_unreachable_hub_is_one_line_within_seconds(spec, env, tmp_path):
    port = _closed_port()
    env = {k: v.format(port=port) for k, v in env.items()}
    env.update(HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf"), MODELSCOPE_CACHE=str(tmp_path / "ms"))
    start = time.monotonic()
    res = famtune_cli("chat", spec, "--prompt", "hi", check=False, env=env, timeout=60)
    elapsed = time.monotonic() - start
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith(f"famtune: error: {spec}: not a local directory, not in the "), res.stderr
    assert "cannot be reached" in lines[-1] and "Traceback" not in res.stderr, res.stderr
    assert "127.0.0.1" in lines[-1] or "famtune-no-such-host.invalid" in lines[-1]
    assert elapsed < 5, f"{elapsed:.1f} s"


def test_offline_mode_is_named(tmp_path):
    res = famtune_cli(
        "chat", "Org/Name", "--prompt", "hi", check=False, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    )
    assert res.returncode != 0
    assert res.stderr.strip().splitlines()[-1] == (
        "famtune: error: Org/Name: not a local directory, not in the Hugging Face cache, and HF_HUB_OFFLINE is set; "
        "download it on a connected machine and pass its directory"
    )


def test_a_file_is_not_a_model_directory(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    res = famtune_cli("chat", str(f), "--prompt", "hi", check=False)
    assert res.stderr.strip().splitlines()[-1] == (
        f"famtune: error: {f}: is a file, not a model directory; pass the directory holding config.json"
    )


def test_tokenizer_ids_beyond_the_embedding_are_one_line(tmp_path):
    """A tokenizer from another model (more ids than embedding rows) is refused when the model loads,
    naming both numbers, instead of an IndexError at the first such token."""
    from transformers import AutoTokenizer

    from conftest import build_tiny

    model_dir = build_tiny("qwen2.5", tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = len(tok)
    tok.add_tokens([f"<extra_{i}>" for i in range(5)])
    tok.save_pretrained(model_dir)
    res = famtune_cli("chat", str(model_dir), "--prompt", "<extra_4>", check=False)
    assert res.returncode != 0
    assert res.stderr.strip().splitlines()[-1] == (
        f"famtune: error: {model_dir}: the tokenizer has ids up to {rows + 4} but the model's embedding has only "
        f"{rows} rows; the tokenizer files do not belong to these weights (copy the tokenizer the model was trained "
        "with, or resize the embeddings before training)"
    )
