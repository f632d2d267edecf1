"""famtune serve: the OpenAI-compatible API on a tiny Qwen2.5 base with a QLoRA adapter trained to
give known answers, served on 127.0.0.1 (a free port) with the official ``openai`` client and raw HTTP.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from serving import ServerThread

from conftest import ADAPTER_ANSWERS, build_base_and_adapter
from famtune.chat import ChatSession, load_base, load_chat_model, profile
from famtune.metadata import read_metadata
from famtune.serve.app import create_app
from famtune.serve.models import load_served

QUESTION = "What is the capital of France?"
TIMEOUT = 60


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    family, base, adapter = build_base_and_adapter(root)
    # The same adapter under two names: several adapters on one base, one copy of its weights.
    models = load_served(str(base), {"tuned": str(adapter), "tuned2": str(adapter)}, base_name="base")
    return {"base": base, "adapter": adapter, "models": models}


@pytest.fixture(scope="module")
def server(built):
    with ServerThread(create_app(built["models"])) as srv:
        yield srv


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)


def post(server, path, body, **kw):
    return httpx.post(server.url + path, json=body, timeout=TIMEOUT, **kw)


def user(text):
    return [{"role": "user", "content": text}]


def test_models_are_the_base_and_each_adapter_sharing_one_base(built, client):
    assert [m.id for m in client.models.list().data] == ["base", "tuned", "tuned2"]
    sessions = [m.session for m in built["models"].values()]
    assert len({id(s.model) for s in sessions}) == 1  # one copy of the weights
    assert client.models.retrieve("tuned").id == "tuned"


@pytest.mark.parametrize("question", list(ADAPTER_ANSWERS))
def test_openai_client_gets_the_trained_answer_and_token_counts(built, client, question):
    reply = client.chat.completions.create(model="tuned", messages=user(question), temperature=0)
    text = reply.choices[0].message.content
    assert text == ADAPTER_ANSWERS[question]
    assert reply.choices[0].finish_reason == "stop" and reply.object == "chat.completion"
    session = built["models"]["tuned"].session
    prompt = session.prompt_ids(user(question))
    answer = session.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == len(answer) + 1  # and the stop token
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_base_answers_without_the_adapter(built, client):
    got = client.chat.completions.create(model="base", messages=user("hi"), temperature=0, max_tokens=12)
    # Reference: the base loaded on its own, exactly as the adapters' training loaded it (NF4).
    ckpt, own, model = load_base(str(built["base"]), [read_metadata(built["adapter"])])
    stop_ids, sampling, system = profile(own, ckpt.family, ckpt.load_tokenizer())
    alone = ChatSession(model, ckpt.load_tokenizer(), ckpt.family, stop_ids, sampling, system)
    assert got.choices[0].message.content == alone.reply(user("hi"), greedy=True, max_new_tokens=12)
    assert got.choices[0].message.content != ADAPTER_ANSWERS["hi"]
    # the second name of the adapter answers like the first
    again = client.chat.completions.create(model="tuned2", messages=user("hi"), temperature=0)
    assert again.choices[0].message.content == ADAPTER_ANSWERS["hi"]


def test_streaming_with_the_openai_client(client):
    chunks = list(
        client.chat.completions.create(
            model="tuned", messages=user(QUESTION), temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 2 and "".join(pieces) == ADAPTER_ANSWERS[QUESTION]
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "stop"
    assert finish[0].usage.completion_tokens > 2  # usage rides on the finishing chunk too
    assert chunks[-1].choices == [] and chunks[-1].usage == finish[0].usage


def test_raw_sse_ends_with_done(server):
    with httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        timeout=TIMEOUT,
        json={"model": "tuned", "messages": user("hi"), "stream": True, "temperature": 0},
    ) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    text = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert text == ADAPTER_ANSWERS["hi"]


def test_stop_strings_cut_the_reply_streamed_or_not(client):
    kw = dict(model="tuned", messages=user(QUESTION), temperature=0, stop=[" capital", "zzz"])
    whole = client.chat.completions.create(**kw)
    assert whole.choices[0].message.content == "Paris is the" and whole.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw) if c.choices
    )
    assert streamed == "Paris is the"


def test_n_seed_max_tokens_and_top_p(client):
    kw = dict(model="base", messages=user("tell me a story"), temperature=1.5, top_p=0.9, max_tokens=8, n=3)
    first = client.chat.completions.create(seed=7, **kw)
    again = client.chat.completions.create(seed=7, **kw)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]  # same seed, same samples
    assert len(set(texts)) > 1  # three different samples
    assert all(c.finish_reason == "length" for c in first.choices) and first.usage.completion_tokens == 24


def test_completions_echo_logprobs_score_the_prompt(built, client):
    text = "Paris is the capital of France."
    got = client.completions.create(model="tuned", prompt=text, max_tokens=0, echo=True, logprobs=2)
    choice = got.choices[0]
    assert choice.text == text and got.usage.completion_tokens == 0
    # Reference: log-softmax of a separate base+adapter load, computed here.
    ref = load_chat_model(str(built["base"]), adapter=str(built["adapter"]))
    ids = ref.tokenizer(text)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(ref.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    expected = [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert (
        choice.logprobs.token_logprobs[0] is None and len(choice.logprobs.tokens) == len(ids) == got.usage.prompt_tokens
    )
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert "".join(choice.logprobs.tokens) == text and choice.logprobs.text_offset[1] == len(choice.logprobs.tokens[0])
    assert all(len(t) == 2 for t in choice.logprobs.top_logprobs[1:])


def test_completions_greedy_tokens_are_the_top_logprob(client):
    got = client.completions.create(
        model="base", prompt=[[1, 2, 3], [40, 50, 60, 70]], max_tokens=5, temperature=0, logprobs=1
    )
    assert len(got.choices) == 2 and got.usage.completion_tokens == 10 and got.usage.prompt_tokens == 7
    for choice in got.choices:
        lp = choice.logprobs
        assert "".join(lp.tokens) == choice.text and len(lp.tokens) == 5 and choice.finish_reason == "length"
        for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
            assert chosen == pytest.approx(max(top.values()), abs=1e-5)


BAD = [
    ("/v1/chat/completions", b"{not json", 400, "invalid_json"),
    ("/v1/chat/completions", [1, 2], 400, None),
    ("/v1/chat/completions", {"model": "nope", "messages": user("hi")}, 404, "model_not_found"),
    ("/v1/chat/completions", {"model": "tuned", "messages": []}, 400, None),
    ("/v1/chat/completions", {"messages": user("hi")}, 400, None),
    ("/v1/chat/completions", {"model": "tuned", "messages": [{"role": "tool", "content": "x"}]}, 400, None),
    ("/v1/chat/completions", {"model": "tuned", "messages": [{"role": "robot", "content": "x"}]}, 400, None),
    (
        "/v1/chat/completions",
        {"model": "tuned", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
        400,
        None,
    ),
    ("/v1/chat/completions", {"model": "tuned", "messages": [{"role": "user", "content": 5}]}, 400, None),
    ("/v1/chat/completions", {"model": "tuned", "messages": user("word " * 2000)}, 400, "context_length_exceeded"),
    (
        "/v1/chat/completions",
        {"model": "tuned", "messages": user("hi"), "max_tokens": 10**6},
        400,
        "context_length_exceeded",
    ),
    ("/v1/chat/completions", {"model": "tuned", "messages": user("hi"), "temperature": 3}, 400, None),
    ("/v1/chat/completions", {"model": "tuned", "messages": user("hi"), "n": 1000}, 400, None),
    ("/v1/chat/completions", {"model": "tuned", "messages": user("hi"), "stop": list("abcde")}, 400, None),
    ("/v1/completions", {"model": "tuned", "prompt": [10**9]}, 400, None),
    ("/v1/completions", {"model": "tuned", "prompt": ""}, 400, None),
    ("/v1/completions", {"model": "tuned", "prompt": "hi", "logprobs": 99}, 400, None),
    ("/v1/nowhere", {}, 404, None),
]


@pytest.mark.parametrize("path,body,status,code", BAD)
def test_bad_requests_get_openai_errors(server, path, body, status, code):
    if isinstance(body, bytes):
        resp = httpx.post(
            server.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=TIMEOUT
        )
    else:
        resp = post(server, path, body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and "Traceback" not in resp.text
    if code:
        assert error["code"] == code


def test_the_openai_client_raises_its_own_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=user("hi"))
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.chat.completions.create(model="tuned", messages=user("hi"), max_tokens=100000)


def test_concurrent_greedy_requests_equal_their_sequential_answers(server):
    requests = []
    for i in range(10):
        model = ["base", "tuned", "tuned2"][i % 3]
        question = ["hi", QUESTION, f"story number {i}", "hello there"][i % 4]
        requests.append(
            {"model": model, "messages": user(question), "temperature": 0, "max_tokens": 16 + i, "stream": i % 2 == 1}
        )

    def ask(body):
        if not body["stream"]:
            return post(server, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=TIMEOUT) as resp:
            return "".join(
                json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                for line in resp.iter_lines()
                if line.startswith("data: {")
            )

    sequential = [ask(b) for b in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        concurrent = list(pool.map(ask, requests))
    assert concurrent == sequential
    assert len(set(sequential)) >= 4  # different prompts and models: a mix-up would show


def test_a_client_that_disconnects_stops_its_generation(server, built):
    # A prompt the random base answers at length: uninterrupted, it writes all 400 tokens.
    for text in ("tell me everything", "hello there", "story", "a b c", "1 2 3", "the quick brown fox"):
        body = {"model": "base", "messages": user(text), "temperature": 0, "max_tokens": 400}
        if post(server, "/v1/chat/completions", body).json()["choices"][0]["finish_reason"] == "length":
            break
    else:
        raise AssertionError("no prompt makes the base write 400 tokens")
    finished = server.app.state.finished
    seen = len(finished)
    with httpx.stream(
        "POST", server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=TIMEOUT
    ) as resp:
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(5)]  # a few tokens in, the client goes away
    assert any("content" in g for g in got)
    deadline = time.monotonic() + 30
    while len(finished) == seen:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    last = finished[-1]
    assert last["finish_reason"] == "cancelled" and last["completion_tokens"] < 400


def test_api_key_is_required_when_set(built):
    with ServerThread(create_app(built["models"], api_key="s3cret")) as srv:
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        wrong = httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert httpx.post(srv.url + "/v1/chat/completions", content=b"{bad").status_code == 401
        assert httpx.get(srv.url + "/").status_code == 200  # the page asks for the key itself
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0, timeout=TIMEOUT)
        reply = good.chat.completions.create(model="tuned", messages=user("hi"), temperature=0)
        assert reply.choices[0].message.content == ADAPTER_ANSWERS["hi"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_cli_reports_an_adapter_that_is_not_one(built, tmp_path):
    from conftest import famtune_cli

    res = famtune_cli("serve", built["base"], "--adapter", f"x={tmp_path}", check=False, timeout=120)
    assert (
        res.returncode == 2 and res.stderr.startswith("famtune: error: --adapter x=") and "Traceback" not in res.stderr
    )


def test_a_comparison_output_serves_each_run_beside_its_base(built, tmp_path):
    import shutil

    from famtune.serve.models import is_comparison, load_comparison

    # The layout `famtune compare` writes: one run directory per model and report/results.json.
    work = tmp_path / "comparison"
    runs = []
    for name in ("qwen-a", "qwen-b"):
        shutil.copytree(built["adapter"], work / name)
        runs.append({"name": name, "dir": str(work / name), "status": "ok"})
    runs.append({"name": "broken", "dir": str(work / "broken"), "status": "failed"})
    (work / "report").mkdir()
    (work / "report" / "results.json").write_text(json.dumps({"models": runs}), encoding="utf-8")
    assert is_comparison(str(work)) and not is_comparison(str(built["adapter"]))
    models = load_comparison(str(work))
    assert list(models) == ["qwen-a/base", "qwen-a", "qwen-b/base", "qwen-b"]
    assert [m.kind for m in models.values()] == ["base", "adapter"] * 2
    with ServerThread(create_app(models)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=TIMEOUT)
        for name in ("qwen-a", "qwen-b"):
            reply = client.chat.completions.create(model=name, messages=user("hi"), temperature=0)
            assert reply.choices[0].message.content == ADAPTER_ANSWERS["hi"]


def test_streamed_completion_equals_the_whole_one(client):
    kw = dict(model="base", prompt="hello there", max_tokens=6, temperature=0, echo=True)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert whole.choices[0].text.startswith("hello there") and len(whole.choices[0].text) > len("hello there")
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 6
