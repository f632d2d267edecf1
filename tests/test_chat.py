"""famtune.chat: replies from a merged model and from base+adapter, one-shot and multi-turn.

Uses a tiny random-weight Qwen2.5 checkpoint from the installed Qwen plugin and a QLoRA adapter
trained on it for a few steps to answer two prompts, so replies are known and end on a stop token.
"""

from __future__ import annotations

import io

import pytest
import torch

from conftest import ADAPTER_ANSWERS, ADAPTER_FAMILY, build_base_and_adapter
from famtune.chat import load_chat_model, run_chat
from famtune.merge import merge

FAMILY = ADAPTER_FAMILY
ANSWERS = ADAPTER_ANSWERS
STOP_TEXT = ("<|im_end|>", "<|endoftext|>")


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    family, base, adapter = build_base_and_adapter(root)
    merge(str(adapter), str(root / "merged"), log=lambda _: None)
    return {
        "family": family,
        "base": base,
        "adapter": adapter,
        "merged": load_chat_model(str(root / "merged")),
        "with_adapter": load_chat_model(str(base), adapter=str(adapter)),
    }


def record_prompts(model):
    """The prompt ids of every generate() call (its first forward pass sees the whole prompt)."""
    prompts: list[list[int]] = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] > 1:
            prompts.append(ids[0].tolist())

    # PeftModel.generate runs the wrapped model's forward, not its own.
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return prompts, inner.register_forward_pre_hook(hook, with_kwargs=True)


def encode(session, messages):
    return session.family.encode(
        session.tokenizer, messages, masking="all_assistant", add_generation_prompt=True
    ).input_ids


def chat_once(session, prompt, system=None):
    out = io.StringIO()
    assert run_chat(session, prompt=prompt, system=system, greedy=True, max_new_tokens=24, output=out) == 0
    return out.getvalue()


@pytest.mark.parametrize("question", list(ANSWERS))
def test_prompt_reply_is_the_same_merged_and_with_adapter(built, question):
    merged = chat_once(built["merged"], question)
    with_adapter = chat_once(built["with_adapter"], question)
    assert merged == with_adapter == ANSWERS[question] + "\n"
    assert not any(stop in merged for stop in STOP_TEXT)


def test_interactive_chat_keeps_history_until_reset(built):
    session = built["merged"]
    lines = iter(["hi", "What is the capital of France?", "/reset", "", "What is the capital of France?"])

    def read(prompt_text):
        assert prompt_text == ">>> "
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    prompts, handle = record_prompts(session.model)
    out = io.StringIO()
    try:
        code = run_chat(session, prompt=None, system=None, greedy=True, max_new_tokens=24, input_fn=read, output=out)
    finally:
        handle.remove()
    assert code == 0
    first = [{"role": "user", "content": "hi"}]
    second = first + [
        {"role": "assistant", "content": ANSWERS["hi"]},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    after_reset = second[-1:]
    assert prompts == [encode(session, first), encode(session, second), encode(session, after_reset)]
    text = out.getvalue()
    assert ANSWERS["hi"] + "\n" in text and "(new conversation)" in text
    assert not any(stop in text for stop in STOP_TEXT)


def test_exit_stops_reading(built):
    calls = []

    def read(_):
        calls.append(1)
        return "/exit"

    assert (
        run_chat(
            built["merged"],
            prompt=None,
            system=None,
            greedy=True,
            max_new_tokens=4,
            input_fn=read,
            output=io.StringIO(),
        )
        == 0
    )
    assert len(calls) == 1


def test_system_prompt_is_used(built):
    session = built["with_adapter"]
    prompts, handle = record_prompts(session.model)
    try:
        chat_once(session, "hi", system="You are a robot.")
    finally:
        handle.remove()
    assert prompts == [
        encode(session, [{"role": "system", "content": "You are a robot."}, {"role": "user", "content": "hi"}])
    ]


def test_streamed_pieces_make_up_the_reply(built):
    pieces: list[str] = []
    reply = built["merged"].reply([{"role": "user", "content": "hi"}], stream=pieces.append, greedy=True)
    assert len(pieces) > 1 and "".join(pieces) == reply == ANSWERS["hi"]


def test_sampling_defaults_and_overrides(built):
    session = built["merged"]
    assert session.sampling["do_sample"] is True  # the family's defaults, through famtune.json
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    torch.manual_seed(0)
    sampled = session.reply(messages, max_new_tokens=8)
    assert isinstance(sampled, str) and not any(stop in sampled for stop in STOP_TEXT)
    # A near-zero temperature without the repetition penalty samples the greedy answer.
    near_greedy = session.reply(messages, temperature=1e-3, repetition_penalty=1.0)
    assert near_greedy == session.reply(messages, greedy=True) == ANSWERS[messages[0]["content"]]


def test_plain_base_uses_the_plugin_claim_and_family_defaults(built):
    session = load_chat_model(str(built["base"]))
    defaults = built["family"].generation_defaults(session.tokenizer)
    assert session.family.name == FAMILY
    assert session.stop_ids == list(defaults.stop_ids) and session.sampling == dict(defaults.sampling)
    assert session.system is None
    assert isinstance(session.reply([{"role": "user", "content": "hi"}], greedy=True, max_new_tokens=4), str)
