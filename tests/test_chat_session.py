"""famtune.load_chat (the Python chat API), its %%chat IPython magic, and the terminal chat's comforts
(readline, /help, /system, /save, Ctrl-C, long conversations, non-UTF-8 input) in a real pseudo-terminal.

Uses the tiny Qwen2.5 base and the QLoRA adapter trained to give known answers (conftest).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pexpect
import pytest

import famtune
from conftest import ADAPTER_ANSWERS, build_base_and_adapter

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat-api")
    family, base, adapter = build_base_and_adapter(root)
    chat = famtune.load_chat(str(base), adapter=str(adapter), greedy=True, max_new_tokens=24)
    return {"base": base, "adapter": adapter, "chat": chat}


def record_prompts(model):
    """The prompt ids of every generate() call (its first forward pass sees the whole prompt)."""
    prompts: list[list[int]] = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] > 1:
            prompts.append(ids[0].tolist())

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return prompts, inner.register_forward_pre_hook(hook, with_kwargs=True)


def test_load_chat_keeps_history_streams_and_resets(built):
    chat = built["chat"]
    chat.reset()
    assert chat.chat("hi") == ADAPTER_ANSWERS["hi"]
    # the second turn is generated from the whole conversation (the adapter was trained on single turns,
    # so its answer is whatever the model says to both turns together)
    both = chat.messages(QUESTION)
    expected = chat.session.reply(both, greedy=True, max_new_tokens=24)
    pieces = list(chat.chat(QUESTION, stream=True))
    assert len(pieces) > 1 and "".join(pieces) == expected
    assert chat.history == both + [{"role": "assistant", "content": expected}]
    # the second turn was generated from the whole conversation
    prompts, handle = record_prompts(chat.session.model)
    try:
        chat.chat("hi")
    finally:
        handle.remove()
    assert prompts == [chat.session.prompt_ids(chat.messages()[:-1])]
    chat.reset()
    assert chat.history == []


def test_a_stream_left_early_records_no_turn(built):
    chat = built["chat"]
    chat.reset()
    stream = chat.chat(QUESTION, stream=True)
    next(stream)
    stream.close()  # the consumer stops: the generation is cancelled and the turn dropped
    assert chat.history == []


def test_a_conversation_longer_than_the_context_drops_the_oldest_turns(built):
    chat = built["chat"]
    limit = chat.session.context_length
    assert limit == 512  # the tiny model's; the filler below is sized for it
    warnings = []
    chat.warn = warnings.append
    filler = "the quick brown fox jumps over the lazy dog " * 12
    chat.history = []
    for i in range(6):
        chat.history += [{"role": "user", "content": f"{i} {filler}"}, {"role": "assistant", "content": filler}]
    assert len(chat.session.prompt_ids(chat.messages("hi"))) + chat.max_new_tokens > limit
    kept = None
    for start in range(0, 12, 2):  # the newest turns that fit, as the chat should choose them
        candidate = chat.history[start:] + [{"role": "user", "content": "hi"}]
        if len(chat.session.prompt_ids(candidate)) + chat.max_new_tokens <= limit:
            kept = chat.history[start:]
            break
    prompts, handle = record_prompts(chat.session.model)
    try:
        reply = chat.chat("hi")
    finally:
        handle.remove()
    assert kept is not None and chat.dropped_turns == (12 - len(kept)) // 2 > 0
    assert prompts == [chat.session.prompt_ids(kept + [{"role": "user", "content": "hi"}])]
    assert chat.history == kept + [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}]
    assert len(warnings) == 1 and "context" in warnings[0] and f"oldest {chat.dropped_turns} turn" in warnings[0]
    # a single message too long for the context is refused with a way out
    with pytest.raises(famtune.errors.FamtuneError, match="shorten it"):
        chat.chat(filler * 10)
    chat.warn = None


def test_ipython_chat_cell_magic(built):
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    shell = InteractiveShell.instance()
    try:
        shell.run_line_magic("load_ext", "famtune")
        built["chat"].reset()
        with capture_output() as out:
            shell.run_cell_magic("chat", "", "hi\n")
        assert out.stdout == ADAPTER_ANSWERS["hi"] + "\n" and len(built["chat"].history) == 2
        shell.run_line_magic("chat_reset", "")
        assert built["chat"].history == []
        shell.user_ns["other"] = built["chat"]
        with capture_output() as out:
            shell.run_cell_magic("chat", "other", QUESTION)
        assert out.stdout.strip() == ADAPTER_ANSWERS[QUESTION] and len(built["chat"].history) == 2
        with capture_output() as out:
            shell.run_cell_magic("chat", "missing", "hi")
        assert "famtune: error: %%chat missing: no chat called 'missing'" in out.stderr
    finally:
        InteractiveShell.clear_instance()


@pytest.mark.slow  # starts famtune chat in a subprocess (loads the model)
def test_non_utf8_stdin_is_replaced_and_reported_and_long_messages_refused(built):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "famtune.cli",
            "chat",
            str(built["base"]),
            "--adapter",
            str(built["adapter"]),
            "--greedy",
            "--max-new-tokens",
            "24",
        ],
        input=b"h\xffi\n/reset\nhi\n" + b"word " * 1000 + b"\n/exit\n",
        capture_output=True,
        timeout=300,
    )
    out, err = res.stdout.decode(), res.stderr.decode()
    assert "(the line had bytes that are not UTF-8; they are sent as U+FFFD)" in out
    assert res.returncode == 0 and ADAPTER_ANSWERS["hi"] in out and "Traceback" not in err
    # a message longer than the context: a one-line error, and the chat goes on to /exit
    assert "famtune: error: the message is " in out and "context is 512; shorten it" in out


@pytest.mark.slow  # starts famtune chat in a pseudo-terminal (loads the model)
def test_terminal_chat_in_a_pseudo_terminal(built, tmp_path):
    # The bare base (random weights) with a prompt it answers at length (no stop token in 100
    # tokens), for Ctrl-C to cut short. Replies stay short enough that the conversation fits the
    # tiny model's context (random bytes decode to U+FFFD, which re-encodes to more tokens).
    from famtune.chat import load_chat_model

    session = load_chat_model(str(built["base"]))
    long_prompt = next(
        (
            p
            for p in (
                "tell me everything",
                "hello there",
                "story",
                "a b c",
                "1 2 3",
                "the quick brown fox",
                "zzz",
                "robot paint",
            )
            if session.generate(
                session.prompt_ids([{"role": "user", "content": p}]), session.settings(greedy=True), max_new_tokens=100
            ).finish_reason
            == "length"
        ),
        None,
    )
    assert long_prompt, "no prompt makes the base write 100 tokens"
    saved = tmp_path / "conversation.json"
    child = pexpect.spawn(
        sys.executable,
        ["-m", "famtune.cli", "chat", str(built["base"]), "--greedy", "--max-new-tokens", "100"],
        env={**os.environ, "FAMTUNE_CACHE": str(tmp_path / "cache"), "TERM": "dumb"},
        encoding="utf-8",
        timeout=180,
        dimensions=(40, 200),
        # A terminal's Ctrl-C interrupts; a suite started in the background (``cmd &`` in a script)
        # hands its children SIGINT ignored, which the chat would keep.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        child.expect(">>> ")
        child.sendline("/help")
        child.expect(r"/save FILE")
        child.expect(">>> ")
        for _ in range(3):
            child.sendline(long_prompt)
            child.expect(long_prompt)  # the echo
            child.expect(r"\S{3}", timeout=120)  # the reply has started streaming
            # Hold the process while Ctrl-C is typed: the reply cannot run on meanwhile.
            child.kill(signal.SIGSTOP)
            child.sendintr()  # Ctrl-C: the reply stops, the chat goes on
            child.kill(signal.SIGCONT)
            if child.expect([r"\(interrupted\)", ">>> "], timeout=60) == 0:
                break
            # On a busy machine the reply can end before the test stops the process; that Ctrl-C
            # landed at the prompt. Start over with an empty conversation.
            child.sendline("/reset")
            child.expect(r"\(new conversation\)")
        else:
            pytest.fail(f"Ctrl-C never landed while a reply was streaming; the terminal showed {child.before!r}")
        child.expect(">>> ")
        # readline: Ctrl-A moves to the start of the line ("i", then "h" before it)
        child.send("i\x01h\r")
        child.expect(">>> ", timeout=120)
        child.send("\x1b[A\r")  # up arrow: the last line again
        child.expect(">>> ", timeout=120)
        child.sendline(f"/save {saved}")
        child.expect(r"\(saved 4 messages to ", timeout=30)
        child.expect(">>> ")
        child.sendline("/system You are terse.")
        child.expect(r"\(system prompt set; new conversation\)")
        child.expect(">>> ")
        child.sendline(f"/save {saved}.2")
        child.expect(r"\(saved 0 messages to ")
        child.expect(">>> ")
        child.sendintr()  # Ctrl-C at the prompt does not quit either
        child.expect(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    messages = json.loads(saved.read_text(encoding="utf-8"))["messages"]
    # the interrupted turn is not kept; both edited lines arrived as "hi"
    assert [(m["role"], m["content"]) for m in messages if m["role"] == "user"] == [("user", "hi")] * 2
    assert [m["role"] for m in messages] == ["user", "assistant"] * 2
    assert messages[1]["content"] == session.reply([{"role": "user", "content": "hi"}], greedy=True, max_new_tokens=100)
    assert json.loads((tmp_path / "conversation.json.2").read_text())["messages"] == [
        {"role": "system", "content": "You are terse."}
    ]
    assert (tmp_path / "cache" / "chat_history").read_text().count("hi") >= 2  # readline history kept
