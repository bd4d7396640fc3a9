"""`llmcad serve` with the official `openai` client against servers started here on 127.0.0.1 (a free
port), with the tiny llama pair and a chat template.

Every output is compared with ``engine.generate`` of a reference engine given the same parameters.
Every test runs under a time limit (SIGALRM), every client call has a timeout, and servers started
here must leave no thread behind.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import http.client
import json
import logging
import os
import queue
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

import pair_models
from child_cli import LLMCAD_WITH_SIGINT, child_env
from llmcad import LLMCad
from llmcad.errors import ModelLoadError
from llmcad.models.chat import chat_prompt_ids
from llmcad.serve.limits import Limits
from llmcad.serve.server import make_server
from llmcad.serve.textstream import TextStream, cut_at_stop, held_back
from llmcad.serve import worker as worker_module
from llmcad.serve.worker import GenerationWorker

MODEL = "tiny"
PROMPT = "def add(a, b):"
MESSAGES = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def add(a, b):"}]
N = 10  # generated tokens in most checks (the machine running the tests may be slow and shared)
TEST_LIMIT_S = 120
CLIENT_TIMEOUT_S = 60
SLOW_IO = {"bandwidth_cap": 4e6}  # bytes/s: a streamed tiny pass takes ~0.1 s, long enough to act mid-stream


@pytest.fixture(autouse=True)
def time_limit():
    """Fail (instead of hanging) a test that runs past TEST_LIMIT_S."""
    def expire(signum, frame):
        raise TimeoutError(f"test ran past its {TEST_LIMIT_S} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, TEST_LIMIT_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------- fixtures: models, reference, servers
@pytest.fixture(scope="module")
def pair(tiny_pair_dirs, tmp_path_factory):
    """The tiny llama target and its shared-layers draft, with a tokenizer that has a chat template."""
    tokenizer = pair_models.build_tokenizer(chat_template=pair_models.CHAT_TEMPLATE)
    dirs, root = tiny_pair_dirs("llama"), tmp_path_factory.mktemp("serve")
    return {kind: pair_models.copy_with_tokenizer(dirs[src], root / kind, tokenizer)
            for kind, src in (("draft", "shared"), ("target", "target"))}


@pytest.fixture(scope="module")
def reference(pair):
    with LLMCad.from_pretrained(pair["draft"], pair["target"]) as engine:
        yield engine


@pytest.fixture(scope="module")
def streaming_budget(pair):
    """A memory budget under which every target layer is streamed."""
    return pair_models.least_budget(pair["draft"], pair["target"])


class Running:
    """A server on a thread: its worker, base URL and clients (which send the server's API key)."""

    def __init__(self, server, worker, thread, api_key=None):
        self.server, self.worker, self.thread, self.api_key = server, worker, thread, api_key
        self.url = f"http://127.0.0.1:{server.port}"
        self.clients = []  # closed when the server stops (an open connection is a ResourceWarning)

    def client(self, timeout=CLIENT_TIMEOUT_S, api_key=None) -> openai.OpenAI:
        client = openai.OpenAI(base_url=self.url + "/v1", api_key=api_key or self.api_key or "unused", max_retries=0,
                               timeout=timeout)
        self.clients.append(client)
        return client

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def post(self, path: str, content, headers=None, **kw) -> httpx.Response:
        body = content if isinstance(content, (bytes, str)) else json.dumps(content)
        auth = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.post(self.url + path, content=body, headers={"content-type": "application/json", **auth,
                                                                  **(headers or {})},
                          timeout=CLIENT_TIMEOUT_S, **kw)

    def wait_idle(self, timeout=30) -> dict:
        """/health once nothing runs or waits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = self.health()
            if not h["running"] and h["queue"]["waiting"] == 0:
                return h
            time.sleep(0.02)
        raise AssertionError(f"the server stayed busy: {self.health()}")


@contextlib.contextmanager
def running_server(load, max_queue=4, wait_ready=True, limits=Limits()):
    """Start a server (port 0: a free one) on a thread; on exit, stop it as a signal would and check its
    thread ended."""
    worker = GenerationWorker(load, max_queue)
    server = make_server(worker, MODEL, port=0, log_level="warning", limits=limits)
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "the server did not start"
    if wait_ready:
        assert worker.ready.wait(60) and worker.state == "ready", worker.load_error
    running = Running(server, worker, thread, limits.api_key)
    try:
        yield running
    finally:
        for client in running.clients:
            client.close()
        server.should_exit = True
        thread.join(60)
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def server(pair):
    """Resident target, default mode (llmcad): deterministic, so seeded samples can be compared."""
    with running_server(lambda: LLMCad.from_pretrained(pair["draft"], pair["target"]), max_queue=3) as running:
        yield running


@pytest.fixture(scope="module")
def slow_server(pair, streaming_budget):
    """Streamed target with slow reads (llmcad mode, pipelined): long enough generations to act on."""
    def load():
        return LLMCad.from_pretrained(pair["draft"], pair["target"], memory_budget=streaming_budget,
                                      streamer_options=SLOW_IO)

    with running_server(load, max_queue=2) as running:
        yield running


API_KEY = "sk-llmcad-test-key"
GUARDED = Limits(api_key=API_KEY, max_body_bytes=64 << 10, allowed_hosts=("llmcad.test",), read_timeout_s=2.0,
                 max_connections=6)


@pytest.fixture(scope="module")
def guarded_server(pair):
    """Resident target behind an API key, a 64 KiB body limit, one more Host name, a 2 s read deadline
    and 6 connections at most."""
    with running_server(lambda: LLMCad.from_pretrained(pair["draft"], pair["target"]), limits=GUARDED) as running:
        yield running


@pytest.fixture(scope="module")
def long_context_pair(pair, tmp_path_factory):
    """The pair with a 4096-position context: under the least memory budget their KV caches hold fewer
    positions than that (the budget reserves 2048 by default), as the real pair's do."""
    root = tmp_path_factory.mktemp("long-context")
    out = {}
    for kind in ("draft", "target"):
        out[kind] = Path(shutil.copytree(pair[kind], root / kind))
        config = json.loads((out[kind] / "config.json").read_text())
        (out[kind] / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    return out


def least_budget(pair) -> int:
    """The least memory budget of ``pair`` (every target layer streamed)."""
    return pair_models.least_budget(pair["draft"], pair["target"])


def raw_response(sock) -> tuple:
    """(status, JSON body) of the response the server sends on ``sock``."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, json.loads(response.read() or b"null")


def connect(running) -> socket.socket:
    return socket.create_connection(("127.0.0.1", running.server.port), timeout=10)


class BlockingTokenizer:
    """Wraps a tokenizer: each call that tokenizes (a text, or a chat template with tokenize=True) is
    counted and waits for ``release`` after setting ``entered``."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0
        self.entered, self.release = threading.Event(), threading.Event()

    def _enter(self):
        self.calls += 1
        self.entered.set()
        assert self.release.wait(60)

    def __call__(self, *args, **kwargs):
        self._enter()
        return self.tokenizer(*args, **kwargs)

    def apply_chat_template(self, *args, tokenize=True, **kwargs):
        if tokenize:
            self._enter()
        return self.tokenizer.apply_chat_template(*args, tokenize=tokenize, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@contextlib.contextmanager
def blocking_tokenizer(running):
    """The server's request-checking tokenizer replaced by a BlockingTokenizer while inside."""
    frontend = running.worker.frontend
    blocking = BlockingTokenizer(frontend.tokenizer)
    running.worker.frontend = dataclasses.replace(frontend, tokenizer=blocking)
    try:
        yield blocking
    finally:
        blocking.release.set()
        running.worker.frontend = frontend


def chat_ids(engine, messages=MESSAGES) -> list:
    return chat_prompt_ids(engine.tokenizer, messages)


def stream_text(stream, chat: bool) -> tuple[str, list]:
    """(concatenated text, chunks) of a streamed response."""
    chunks = list(stream)
    pieces = [(c.choices[0].delta.content if chat else c.choices[0].text) or "" for c in chunks if c.choices]
    return "".join(pieces), chunks


def threads_settle(before: set, timeout=10) -> set:
    """Threads started since ``before`` that are still alive after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and set(threading.enumerate()) - before:
        time.sleep(0.02)
    return set(threading.enumerate()) - before


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---------------------------------------------------------------- text stream (no server)
def test_text_stream_holds_back_what_may_start_a_stop_string(tiny_tokenizer):
    assert cut_at_stop("abc\ndef x", ["\ndef", "zz"]) == ("abc", True)
    assert cut_at_stop("abc", ["zz"]) == ("abc", False)
    assert held_back("abc\nde", ["\ndef"]) == 3 and held_back("abc", ["\ndef"]) == 0
    ids = tiny_tokenizer("for i in range(10):\n    print(i * i)\n", add_special_tokens=False)["input_ids"]
    for stops in ([], ["range"], ["(i *", "print"], ["never there"]):
        text = TextStream(tiny_tokenizer, stops)
        pieces = [text.push([t]) for t in ids] + [text.finish()]
        assert "".join(pieces) == text.final() == cut_at_stop(tiny_tokenizer.decode(ids), stops)[0]
        assert not any(s in "".join(pieces) for s in stops)


def test_job_queue_bounds_the_waiting_jobs_not_the_running_one():
    from llmcad.serve.errors import APIError
    from llmcad.serve.worker import JobQueue

    jobs = JobQueue(limit=0)
    jobs.put("a")  # an idle worker takes it at once: accepted even with no room to wait
    with pytest.raises(APIError) as err:
        jobs.put("b")
    assert err.value.status == 429
    assert jobs.get() == "a"
    with pytest.raises(APIError):
        jobs.put("b")  # "a" runs: nothing may wait
    jobs.done()
    jobs.put("b")
    jobs = JobQueue(limit=2)
    for job in "abc":
        jobs.put(job)
    assert jobs.get() == "a" and len(jobs) == 2 and jobs.remove("b") and not jobs.remove("b")
    jobs.put("d")
    assert [jobs.get(), jobs.get()] == ["c", "d"]
    assert jobs.close() == [] and jobs.get() is None
    with pytest.raises(APIError) as err:
        jobs.put("e")
    assert err.value.status == 503


# ---------------------------------------------------------------- equality with engine.generate
def test_health_and_models(server):
    health = server.health()
    assert health["status"] == "ready" and health["model"] == MODEL and health["queue"]["limit"] == 3
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert server.client().models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("other")


def test_greedy_completion_equals_generate(server, reference):
    want = reference.generate(PROMPT, N)
    got = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == ("stop" if want.stats["stop_reason"] == "eos" else "length")
    prompt_tokens = len(reference.tokenizer(PROMPT)["input_ids"])
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (prompt_tokens, len(want.tokens))
    assert got.usage.total_tokens == prompt_tokens + len(want.tokens)
    stats = got.usage.model_extra["llmcad"]
    # pass counts depend on measured timings (the cost rule), so only their consistency is checked
    assert stats["generated_tokens"] == len(want.tokens) and stats["target_passes"] >= 1
    assert stats["tokens_per_pass"] == pytest.approx(stats["generated_tokens"] / stats["target_passes"])
    assert {"tokens_per_pass", "bytes_read", "tokens_per_s"} <= set(stats)
    # a prompt given as token ids is the same request
    ids = reference.tokenizer(PROMPT)["input_ids"]
    assert server.client().completions.create(model=MODEL, prompt=ids, max_tokens=N,
                                              temperature=0).choices[0].text == want.text


def test_sampled_completion_with_a_seed_equals_generate(server, reference):
    want = reference.generate(PROMPT, N, do_sample=True, temperature=0.9, top_k=40, top_p=0.95, seed=7)
    client = server.client()
    texts = [client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0.9, top_p=0.95,
                                       seed=7, extra_body={"top_k": 40}).choices[0].text for _ in range(2)]
    assert texts == [want.text, want.text]
    other = reference.generate(PROMPT, N, do_sample=True, temperature=0.9, top_k=40, top_p=0.95, seed=8)
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0.9, top_p=0.95, seed=8,
                                     extra_body={"top_k": 40}).choices[0].text == other.text


def test_chat_uses_the_chat_template(server, reference):
    want = reference.generate(MESSAGES, N)
    got = server.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=N, temperature=0)
    assert got.object == "chat.completion"
    assert got.choices[0].message.role == "assistant" and got.choices[0].message.content == want.text
    assert got.usage.prompt_tokens == len(chat_ids(reference))
    # text parts are joined; max_completion_tokens is max_tokens' newer name
    parts = [MESSAGES[0], {"role": "user", "content": [{"type": "text", "text": "def add"},
                                                       {"type": "text", "text": "(a, b):"}]}]
    again = server.client().chat.completions.create(model=MODEL, messages=parts, max_completion_tokens=N,
                                                    temperature=0)
    assert again.choices[0].message.content == want.text


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_streamed_chunks_concatenate_to_the_same_text(server, reference, chat):
    prompt = MESSAGES if chat else PROMPT
    want = reference.generate(prompt, N)
    client = server.client()
    create = client.chat.completions.create if chat else client.completions.create
    request = {"messages": MESSAGES} if chat else {"prompt": PROMPT}
    text, chunks = stream_text(create(model=MODEL, max_tokens=N, temperature=0, stream=True,
                                      stream_options={"include_usage": True}, **request), chat)
    assert text == want.text
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.tokens)
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    if chat:
        assert chunks[0].choices[0].delta.role == "assistant"
        assert all(c.object == "chat.completion.chunk" for c in chunks)
    without_usage = list(create(model=MODEL, max_tokens=N, temperature=0, stream=True, **request))
    assert all(c.usage is None for c in without_usage) and without_usage[-1].choices[0].finish_reason


def test_stop_strings_end_the_text_before_them(server, reference):
    full = reference.generate(PROMPT, N).text
    stop = full[3:5]
    assert stop and full.find(stop) >= 3
    want = full[:full.find(stop)]
    client = server.client()
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0, stop=[stop, "never"])
    assert got.choices[0].text == want and got.choices[0].finish_reason == "stop"
    text, _ = stream_text(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0,
                                                    stop=stop, stream=True), chat=False)
    assert text == want


# ---------------------------------------------------------------- bad requests
def test_malformed_json_and_wrong_types_get_openai_errors(server):
    cases = [
        (b"{not json", 400, None, "could not parse the JSON body"),
        (b"", 400, None, "body is empty"),
        (b"[1, 2]", 400, None, "must be a JSON object"),
        ({"model": MODEL, "prompt": PROMPT, "max_tokens": "5"}, 400, "max_tokens", "valid integer"),
        ({"model": MODEL, "prompt": PROMPT, "max_tokens": True}, 400, "max_tokens", "valid integer"),
        ({"model": MODEL, "prompt": PROMPT, "temperature": "hot"}, 400, "temperature", "valid number"),
        ({"model": MODEL, "prompt": PROMPT, "stop": ["a", 3]}, 400, "stop", "valid string"),
        ({"model": MODEL, "prompt": 12}, 400, "prompt", None),
        ({"model": MODEL}, 400, "prompt", "Missing required parameter"),
        ({"model": MODEL, "prompt": PROMPT, "temperature": 3}, 400, "temperature", "[0, 2]"),
        ({"model": MODEL, "prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens", ">= 1"),
        ({"model": MODEL, "prompt": PROMPT, "seed": -1}, 400, "seed", "seed"),
        ({"model": MODEL, "prompt": PROMPT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
        ({"model": MODEL, "prompt": PROMPT, "frobnicate": 1}, 400, "frobnicate", "Unrecognized request argument"),
        ({"model": MODEL, "prompt": PROMPT, "n": 2}, 400, "n", "n=1"),
        ({"model": MODEL, "prompt": PROMPT, "logprobs": 2}, 400, "logprobs", "not supported"),
        ({"model": MODEL, "prompt": [PROMPT, PROMPT]}, 400, "prompt", "one prompt per request"),
        ({"model": MODEL, "prompt": [1, 99999]}, 400, "prompt", "outside the vocabulary"),
        ({"model": MODEL, "prompt": ""}, 400, "prompt", "empty"),
        ({"model": "gpt-4o", "prompt": PROMPT}, 404, "model", "does not exist"),
    ]
    for body, status, param, text in cases:
        r = server.post("/v1/completions", body)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, (body, error)
        assert text is None or text in error["message"], (body, error)
    chat_cases = [
        ({"model": MODEL, "messages": []}, "messages", "at least one message"),
        ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role", None),
        ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
         "messages.0.content", "only text parts"),
        ({"model": MODEL, "messages": MESSAGES, "tools": [{"type": "function"}]}, "tools", "not supported"),
        ({"model": MODEL, "messages": MESSAGES, "response_format": {"type": "json_object"}}, "response_format",
         "not supported"),
        ({"model": MODEL, "messages": MESSAGES, "max_tokens": 3, "max_completion_tokens": 3},
         "max_completion_tokens", "not both"),
    ]
    for body, param, text in chat_cases:
        r = server.post("/v1/chat/completions", body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
        assert text is None or text in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/nothing", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert httpx.get(server.url + "/v1/completions", timeout=10).status_code == 405
    # ignored fields: accepted and without effect
    ok = server.post("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "temperature": 0,
                                         "user": "u", "n": 1, "presence_penalty": 0, "echo": False})
    assert ok.status_code == 200, ok.text
    assert server.wait_idle()["status"] == "ready"


def test_unknown_model_and_over_long_prompts_with_the_client(server, reference):
    client = server.client()
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt=PROMPT, max_tokens=2)
    assert err.value.body["code"] == "model_not_found"
    context = reference.context_length
    long_ids = [5] * context
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=long_ids, max_tokens=2)
    assert err.value.body["code"] == "context_length_exceeded" and str(context) in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:  # prompt + max_tokens over the context, as OpenAI refuses
        client.completions.create(model=MODEL, prompt=long_ids[:context - 4], max_tokens=5)
    assert err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "fox " * context}])
    assert err.value.body["code"] == "context_length_exceeded" and err.value.body["param"] == "messages"
    # the room left: prompt of context - 4 tokens, 4 new ones, stopped by the context (or EOS)
    got = client.completions.create(model=MODEL, prompt=long_ids[:context - 4], max_tokens=4, temperature=0)
    assert got.usage.completion_tokens <= 4
    assert got.choices[0].text == reference.generate(long_ids[:context - 4], 4).text


# ---------------------------------------------------------------- one generation at a time
def test_requests_queue_in_order_and_a_full_queue_gets_429(slow_server, reference):
    """One long streamed request runs; two wait (the queue holds 2); a fourth gets 429 at once. Once the
    first client leaves, the two waiting ones complete, first in first out, with the right text."""
    want = reference.generate(PROMPT, N).text
    before = slow_server.wait_idle()["requests"]
    long_stream = slow_server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=200,
                                                          temperature=0, stream=True)
    chunks = iter(long_stream)
    next(chunks)  # it runs
    done = {}

    def waiting(name):
        got = slow_server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0)
        done[name] = (time.monotonic(), got.choices[0].text)

    clients = [threading.Thread(target=waiting, args=(name,)) for name in ("first", "second")]
    for c in clients:
        c.start()
        deadline = time.monotonic() + 30
        while slow_server.health()["queue"]["waiting"] < clients.index(c) + 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert slow_server.health()["queue"]["waiting"] == 2 and slow_server.health()["running"]
    t0 = time.monotonic()
    with pytest.raises(openai.RateLimitError) as err:
        slow_server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=N)
    assert time.monotonic() - t0 < 5 and err.value.status_code == 429
    assert err.value.body["code"] == "queue_full" and err.value.body["type"] == "rate_limit_error"
    long_stream.close()  # the client leaves: its generation is cancelled at the next pass boundary
    for c in clients:
        c.join(60)
    assert done["first"][1] == done["second"][1] == want
    assert done["first"][0] < done["second"][0]
    after = slow_server.wait_idle()["requests"]
    assert after["finished"] - before["finished"] == 2 and after["cancelled"] - before["cancelled"] == 1


def test_disconnect_mid_stream_cancels_and_the_next_request_is_clean(slow_server, reference):
    want = reference.generate(PROMPT, N).text
    client = slow_server.client()
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0).choices[0].text == want
    client.close()
    slow_server.wait_idle()
    threads, fds = set(threading.enumerate()), open_fds()
    engine = slow_server.worker.engine
    before = slow_server.health()["requests"]
    for chat in (False, True):
        with httpx.Client(timeout=CLIENT_TIMEOUT_S) as raw:
            body = {"model": MODEL, "max_tokens": 200, "temperature": 0, "stream": True,
                    **({"messages": MESSAGES} if chat else {"prompt": PROMPT})}
            path = "/v1/chat/completions" if chat else "/v1/completions"
            with raw.stream("POST", slow_server.url + path, json=body) as response:
                lines = response.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                assert json.loads(first[6:])["choices"]
        t0 = time.monotonic()
        health = slow_server.wait_idle()
        assert time.monotonic() - t0 < 20
    assert health["requests"]["cancelled"] - before["cancelled"] == 2
    assert health["requests"]["finished"] == before["finished"]
    # the engine's streamed target holds no layer buffer; the next request gets the right text
    assert engine.streamed._held is None
    client = slow_server.client()
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0).choices[0].text == want
    client.close()
    slow_server.wait_idle()
    assert threads_settle(threads) == set()
    deadline = time.monotonic() + 10
    while open_fds() > fds and time.monotonic() < deadline:
        time.sleep(0.02)
    assert open_fds() <= fds


def test_a_client_that_gives_up_waiting_cancels_its_request(slow_server):
    before = slow_server.wait_idle()["requests"]
    with pytest.raises(openai.APITimeoutError):
        slow_server.client(timeout=0.5).completions.create(model=MODEL, prompt=PROMPT, max_tokens=200,
                                                           temperature=0)
    after = slow_server.wait_idle(timeout=20)["requests"]
    assert after["cancelled"] - before["cancelled"] == 1 and after["finished"] == before["finished"]


def test_load_of_concurrent_clients(server, reference):
    """N clients at once, a few rounds: every request completes with the right text or gets a clean 429;
    the server's count of finished requests is exact; memory stays flat after the first round."""
    want = reference.generate(PROMPT, 4).text
    clients, rounds = 12, 4
    process = psutil.Process()

    def one_round():
        outcomes = queue.Queue()

        def run():
            client = server.client()
            try:
                for _ in range(2):
                    try:
                        got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
                        outcomes.put(("ok", got.choices[0].text))
                    except openai.RateLimitError as exc:
                        outcomes.put(("429", exc.body["code"]))
            except Exception as exc:  # noqa: BLE001 - anything else fails the test below
                outcomes.put(("error", repr(exc)))
            finally:
                client.close()

        threads = [threading.Thread(target=run) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert not any(t.is_alive() for t in threads)
        return [outcomes.get_nowait() for _ in range(outcomes.qsize())]

    server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)  # the server's
    before = server.wait_idle()["requests"]["finished"]  # own pool threads start with its first request
    threads = set(threading.enumerate())
    ok = rejected = 0
    rss = []
    for _ in range(rounds):
        results = one_round()
        assert len(results) == 2 * clients
        assert all(r in (("ok", want), ("429", "queue_full")) for r in results), results
        ok += sum(r[0] == "ok" for r in results)
        rejected += sum(r[0] == "429" for r in results)
        server.wait_idle()
        rss.append(process.memory_info().rss)
    assert server.health()["requests"]["finished"] - before == ok
    assert ok >= rounds and ok + rejected == rounds * 2 * clients
    assert max(rss[1:]) - rss[0] < 64 << 20, [r >> 20 for r in rss]
    assert threads_settle(threads) == set()


# ---------------------------------------------------------------- loading, failing, stopping
def test_health_is_not_ready_while_loading_and_requests_get_503(pair):
    release = threading.Event()

    def load():
        assert release.wait(60)
        return LLMCad.from_pretrained(pair["draft"], pair["target"])

    threads = set(threading.enumerate())
    with running_server(load, wait_ready=False) as running:
        r = httpx.get(running.url + "/health", timeout=10)
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = running.post("/v1/completions", {"model": MODEL, "prompt": PROMPT})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        release.set()
        assert running.worker.ready.wait(60)
        assert httpx.get(running.url + "/health", timeout=10).status_code == 200
    assert threads_settle(threads) == set()


def test_a_failed_load_stops_the_server():
    def load():
        raise ModelLoadError("no such model directory: /nowhere")

    worker = GenerationWorker(load, 2)
    server = make_server(worker, MODEL, port=0, log_level="critical")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive() and worker.state == "failed" and "/nowhere" in str(worker.load_error)


def test_stopping_mid_stream_ends_the_stream_and_closes_the_engine(pair, streaming_budget):
    """What Ctrl-C or SIGTERM does in uvicorn (should_exit): the running generation stops at its next
    pass boundary, its client gets an error event, the thread ends and the engine is closed."""
    threads = set(threading.enumerate())
    engines = []

    def load():
        engines.append(LLMCad.from_pretrained(pair["draft"], pair["target"], memory_budget=streaming_budget,
                                              streamer_options=SLOW_IO))
        return engines[0]

    with running_server(load) as running:
        stream = running.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=200, temperature=0,
                                                     stream=True)
        chunks = iter(stream)
        next(chunks)
        t0 = time.monotonic()
        running.server.should_exit = True
        with pytest.raises(openai.APIError, match="shutting down"):
            list(chunks)
        running.thread.join(30)
        assert time.monotonic() - t0 < 20 and not running.thread.is_alive()
    assert engines[0]._closed and running.worker.state == "stopped"
    assert threads_settle(threads) == set()


def test_the_log_says_the_models_are_loading_until_they_are(pair, caplog, monkeypatch):
    monkeypatch.setattr(worker_module, "LOADING_LOG_EVERY_S", 0.05)
    caplog.set_level(logging.INFO, logger="llmcad.serve")

    def load():
        time.sleep(0.5)
        return LLMCad.from_pretrained(pair["draft"], pair["target"])

    with running_server(load):
        pass
    lines = [r.getMessage() for r in caplog.records]
    loading = [i for i, line in enumerate(lines) if re.fullmatch(r"loading the models: [0-9]+ s", line)]
    assert len(loading) >= 3 and max(loading) < lines.index("models loaded: ready")


def test_no_loading_line_follows_the_ready_line(pair, caplog, monkeypatch):
    """A tick that has passed its wait when loading ends logs before "models loaded: ready"."""
    monkeypatch.setattr(worker_module, "LOADING_LOG_EVERY_S", 0.01)
    caplog.set_level(logging.INFO, logger="llmcad.serve")
    info = worker_module.log.info

    def slow_tick(message, *args):
        if message.startswith("loading the models"):
            time.sleep(0.2)  # the tick's line lands after the models are ready
        info(message, *args)

    monkeypatch.setattr(worker_module.log, "info", slow_tick)
    with running_server(lambda: LLMCad.from_pretrained(pair["draft"], pair["target"])):
        pass
    time.sleep(0.5)  # a tick still sleeping would log by now
    lines = [r.getMessage() for r in caplog.records]
    ready = lines.index("models loaded: ready")
    assert not [line for line in lines[ready:] if line.startswith("loading the models")], lines


def test_the_log_names_each_request_and_the_first_pass_layers_it_reads(pair, streaming_budget, caplog,
                                                                       monkeypatch):
    """No silent wait in the server's log: a line when a request starts, the layer the first pass reads
    (every FIRST_PASS_LOG_EVERY_S; 0 here, so every layer), and one when it ends, with its pace."""
    monkeypatch.setattr(worker_module, "FIRST_PASS_LOG_EVERY_S", 0.0)
    caplog.set_level(logging.INFO, logger="llmcad.serve")

    def load():
        return LLMCad.from_pretrained(pair["draft"], pair["target"], memory_budget=streaming_budget)

    with running_server(load) as running:
        layers = len(running.worker.engine.streamed.layers)
        assert len(running.worker.engine.streamed.placement.streamed_layers) == layers
        running.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request 1:")]
    assert re.fullmatch(r"request 1: [1-9][0-9]* prompt tokens, up to 16 new", lines[0])
    reading = [line for line in lines if "reading the target" in line]
    sweep = [f"request 1: reading the target: layer {i}/{layers}" for i in range(1, layers + 1)]
    passes_before_text = len(reading) // layers
    assert reading == sweep * passes_before_text and 1 <= passes_before_text <= 2  # then the first text stops it
    done = re.fullmatch(r"request 1: ([0-9]+) tokens in [0-9.]+ s \(([0-9.]+) tok/s, ([0-9.]+) tokens a pass\)",
                        lines[-1])
    assert done and round(int(done[1]) / float(done[3])) > passes_before_text  # later passes logged nothing


# ---------------------------------------------------------------- who may use the server, and how much
def test_the_api_key_is_asked_as_bearer_auth_except_by_health(guarded_server, reference):
    url = guarded_server.url
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    before = guarded_server.wait_idle()["requests"]
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": API_KEY},
                    {"authorization": f"Basic {API_KEY}"}, {"authorization": f"Bearer {API_KEY}x"}):
        for r in (httpx.get(url + "/v1/models", headers=headers, timeout=10),
                  httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2},
                             headers=headers, timeout=10)):
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (headers, r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_api_key"
            assert "Authorization: Bearer" in error["message"] and API_KEY not in error["message"]
    assert guarded_server.health()["requests"] == before  # nothing was generated
    with pytest.raises(openai.AuthenticationError):
        guarded_server.client(api_key="wrong").models.list()
    client = guarded_server.client()  # the openai client sends Authorization: Bearer KEY
    assert [m.id for m in client.models.list().data] == [MODEL]
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0)
    assert got.choices[0].text == reference.generate(PROMPT, N).text
    assert httpx.get(url + "/v1/models", headers={"authorization": f"bearer {API_KEY}"}, timeout=10).status_code == 200


def test_requests_naming_another_host_are_refused(server, guarded_server):
    """A web page can make its own name resolve to 127.0.0.1 (DNS rebinding); its requests then name it."""
    for running in (server, guarded_server):
        before = running.wait_idle()["requests"]
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.nip.io", "localhost.evil.example", "llmcad.tes"):
            r = running.post("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 2},
                             headers={"host": host})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", (host, r.text)
            assert "--allowed-hosts" in r.json()["error"]["message"]
        assert running.health()["requests"] == before
        port = running.server.port
        auth = {"authorization": f"Bearer {API_KEY}"}
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost", "LocalHost"):
            assert httpx.get(running.url + "/v1/models", headers={"host": host, **auth}, timeout=10).status_code == 200
    # --allowed-hosts adds names to the loopback ones
    assert httpx.get(server.url + "/v1/models", headers={"host": "llmcad.test"}, timeout=10).status_code == 400
    assert httpx.get(guarded_server.url + "/v1/models", headers={"host": "LLMCAD.test:80", **auth},
                     timeout=10).status_code == 200


def test_allowed_host_names():
    from llmcad.serve.limits import host_name, is_loopback

    loopback = {"localhost", "127.0.0.1", "::1"}
    for bind in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"):
        assert is_loopback(bind) and Limits().host_names(bind) == loopback
    for bind in ("0.0.0.0", "::", "192.168.1.5", "example.com"):
        assert not is_loopback(bind) and Limits().host_names(bind) is None
    assert Limits(allowed_hosts=("My.Host", " [fe80::1] ")).host_names("0.0.0.0") == loopback | {"my.host", "fe80::1"}
    assert Limits(allowed_hosts=("*",)).host_names("127.0.0.1") is None
    assert [host_name(h) for h in ("[::1]:8000", "Localhost:80", "::1", "a.b")] == ["::1", "localhost", "::1", "a.b"]


def test_only_json_bodies_are_taken(server, reference):
    """A web page may POST text/plain (or a form) to any address without a CORS preflight; such a body
    must not be taken for JSON."""
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": N, "temperature": 0})
    before = server.wait_idle()["requests"]
    for content_type in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                         "multipart/form-data; boundary=x", None):
        headers = {"content-type": content_type} if content_type else {}
        r = httpx.post(server.url + "/v1/completions", content=body, headers=headers, timeout=10)
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", (content_type, r.text)
        assert "Content-Type: application/json" in r.json()["error"]["message"]
    assert server.health()["requests"] == before
    r = httpx.post(server.url + "/v1/completions", content=body,
                   headers={"content-type": "Application/JSON; charset=utf-8"}, timeout=CLIENT_TIMEOUT_S)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == reference.generate(PROMPT, N).text


def test_bodies_over_the_limit_get_413_before_they_are_read(guarded_server):
    """Three parallel requests announcing 300 MiB get 413 at once, without sending a byte of it; a chunked
    body (no Content-Length) gets 413 once it passes the limit; memory stays flat."""
    rss = psutil.Process().memory_info().rss

    def announce(size: int) -> tuple:
        with connect(guarded_server) as sock:
            sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
                         f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n".encode())
            return raw_response(sock)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(announce, [300 << 20] * 3))
    for status, body in answers:
        assert status == 413 and body["error"]["code"] == "request_too_large", body
        assert "65536 bytes" in body["error"]["message"] and "--max-body-size" in body["error"]["message"]

    def chunks():  # 1 MiB of JSON whitespace, 16 times the limit
        for _ in range(64):
            yield b" " * (16 << 10)

    r = httpx.post(guarded_server.url + "/v1/completions", content=chunks(), timeout=CLIENT_TIMEOUT_S,
                   headers={"content-type": "application/json", "authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert psutil.Process().memory_info().rss - rss < 32 << 20
    padded = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 2}) + " " * (60 << 10)
    assert guarded_server.post("/v1/completions", padded).status_code == 200  # within the limit


def test_slow_clients_are_timed_out_and_connections_are_capped(guarded_server):
    """Clients that trickle a request's head or body get 408 once the read deadline (2 s) passes; past
    the connection cap (6), a new connection gets 503 at once; the server then serves as before."""
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 60\r\n\r\n").encode()

    def trickle(fast: bytes, slow: bytes) -> tuple:
        """Send ``fast``, then ``slow`` a byte every 0.1 s until the server answers; (answer, seconds)."""
        t0 = time.monotonic()
        with connect(guarded_server) as sock:
            sock.sendall(fast)
            for byte in slow:
                if select.select([sock], [], [], 0.1)[0]:
                    break  # the server answered, or closed
                sock.sendall(bytes([byte]))
            sock.settimeout(10)
            answer = b""
            with contextlib.suppress(OSError):
                while chunk := sock.recv(4096):
                    answer += chunk
        return answer, time.monotonic() - t0

    time.sleep(2.5)  # past the read deadline: connections earlier tests left idle are closed, and not counted
    too_large = head.replace(b"Content-Length: 60", b"Content-Length: 100000")
    cases = [(b"", head), (b"", head), (head[:10], head[10:]), (head, b"{" + b" " * 59),  # slow heads, a slow body
             (too_large, b" " * 60)]  # answered 413 at once, then closed at the deadline without another answer
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(lambda case: trickle(*case), cases))
    for answer, seconds in answers[:-1]:
        assert answer.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in answer, answer
        assert 1.5 < seconds < 6, seconds
    answer, seconds = answers[-1]
    assert answer.startswith(b"HTTP/1.1 413 ") and answer.count(b"HTTP/1.1") == 1 and seconds < 6, answer
    held = [connect(guarded_server) for _ in range(GUARDED.max_connections)]
    try:
        with connect(guarded_server) as extra:
            status, body = raw_response(extra)
        assert status == 503 and body["error"]["code"] == "too_many_connections"
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while httpx.get(guarded_server.url + "/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    r = guarded_server.post("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_listening_beyond_loopback_warns(pair, monkeypatch, capsys):
    from llmcad.cli import main
    from llmcad.serve import command, server

    assert all(command.bind_warning(host, None) is None for host in ("127.0.0.1", "localhost", "::1"))
    loud, quiet = command.bind_warning("0.0.0.0", None), command.bind_warning("0.0.0.0", "key")
    assert "NO API KEY" in loud and "--api-key" in loud and command.API_KEY_ENV in loud
    assert quiet.startswith("warning:") and "NO API KEY" not in quiet
    made = []

    class NotServing:
        def run(self):
            pass

    def make(worker, name, host, port, log_level, limits):
        made.append(limits)
        return NotServing()

    monkeypatch.setattr(server, "make_server", make)
    argv = ["serve", "--draft", str(pair["draft"]), "--target", str(pair["target"]), "--host", "0.0.0.0"]
    monkeypatch.delenv(command.API_KEY_ENV, raising=False)
    assert main(argv) == 0 and "NO API KEY" in capsys.readouterr().err and made[-1].api_key is None
    monkeypatch.setenv(command.API_KEY_ENV, "from-the-environment")
    assert main(argv + ["--max-body-size", "1MiB"]) == 0
    err = capsys.readouterr().err
    assert "warning: listening on 0.0.0.0" in err and "NO API KEY" not in err
    assert made[-1].api_key == "from-the-environment" and made[-1].max_body_bytes == 1 << 20
    assert main(argv + ["--api-key", "given"]) == 0 and made[-1].api_key == "given"
    capsys.readouterr()
    for bad, flag in ((["--max-body-size", "lots"], "--max-body-size"), (["--read-timeout", "inf"], "--read-timeout"),
                      (["--max-connections", "0"], "--max-connections"), (["--api-key", " "], "--api-key")):
        assert main(argv + bad) == 2 and flag in capsys.readouterr().err


# ---------------------------------------------------------------- checks before queueing, off the event loop
def test_a_prompt_being_tokenized_does_not_stall_other_clients(server, reference):
    """While one request's prompt is tokenized (held here), the server answers others."""
    for chat in (False, True):
        with blocking_tokenizer(server) as tokenizer:
            done = {}
            body = {"model": MODEL, "max_tokens": N, "temperature": 0,
                    **({"messages": MESSAGES} if chat else {"prompt": PROMPT})}
            path = "/v1/chat/completions" if chat else "/v1/completions"
            thread = threading.Thread(target=lambda: done.update(r=server.post(path, body)))
            thread.start()
            assert tokenizer.entered.wait(30)
            assert httpx.get(server.url + "/health", timeout=5).status_code == 200
            tokenizer.release.set()
            thread.join(60)
        assert done["r"].status_code == 200, done["r"].text
        result = done["r"].json()["choices"][0]
        assert (result["message"]["content"] if chat else result["text"]) == reference.generate(
            MESSAGES if chat else PROMPT, N).text


def test_a_text_certainly_too_long_is_refused_before_it_is_tokenized(server, reference):
    frontend = server.worker.frontend
    assert frontend.chars_per_token == max(map(len, reference.tokenizer.get_vocab()))  # byte-level, no normalizer
    text = "x" * (frontend.context_length * frontend.chars_per_token + 1)
    with blocking_tokenizer(server) as tokenizer:
        tokenizer.release.set()  # tokenizing goes through; it is counted
        r = server.post("/v1/completions", {"model": MODEL, "prompt": text, "max_tokens": 1})
        c = server.post("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": text}]})
        assert tokenizer.calls == 0
    for response, param in ((r, "prompt"), (c, "messages")):
        error = response.json()["error"]
        assert response.status_code == 400 and error["code"] == "context_length_exceeded" and error["param"] == param
        assert "characters long" in error["message"]
    assert f"the prompt is {len(text)} characters long" in r.json()["error"]["message"]
    # just under the bound, it is tokenized (and refused by its token count)
    with blocking_tokenizer(server) as tokenizer:
        tokenizer.release.set()
        r = server.post("/v1/completions", {"model": MODEL, "prompt": text[:-1], "max_tokens": 1})
        assert tokenizer.calls == 1 and r.json()["error"]["code"] == "context_length_exceeded"


def test_the_characters_per_token_bound_holds(reference):
    from tokenizers import normalizers

    from llmcad.serve.prompts import chars_per_token

    tokenizer = reference.tokenizer
    bound = chars_per_token(tokenizer)
    vocab = tokenizer.get_vocab()
    longest = sorted(vocab, key=len)[-20:]
    texts = ["".join(tokenizer.convert_tokens_to_string([t]) for t in longest) * 5, "é" * 300, "\U0001F600" * 50,
             " " * 1000, PROMPT * 20]
    for text in texts:
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) * bound >= len(text)
    stripping, composing = (pair_models.build_tokenizer() for _ in range(2))
    stripping.backend_tokenizer.normalizer = normalizers.Strip()  # deletes text: no bound
    composing.backend_tokenizer.normalizer = normalizers.NFC()
    assert chars_per_token(stripping) is None
    assert chars_per_token(composing) == 4 * max(map(len, composing.get_vocab()))


def test_streamed_requests_are_refused_before_the_stream_begins(server):
    """What generate would refuse is answered 400 up front, streamed or not, not 200 and an error event."""
    client = server.client()
    for stream in (True, False):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=1e-9, stream=stream)
        assert "temperature" in err.value.body["message"]
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=N, temperature=1e-9,
                                           stream=stream)


def test_prompts_over_the_kv_budget_are_refused_before_the_stream_begins(long_context_pair):
    pair = long_context_pair
    budget = least_budget(pair)
    with running_server(lambda: LLMCad.from_pretrained(pair["draft"], pair["target"], memory_budget=budget)) as running:
        positions = running.worker.engine.kv_positions
        assert positions < running.worker.engine.context_length - 2  # the KV room is the tighter bound
        client = running.client()
        for stream in (True, False):
            with pytest.raises(openai.BadRequestError) as err:
                client.completions.create(model=MODEL, prompt=[5] * positions, max_tokens=1, stream=stream)
            assert err.value.body["code"] == "context_length_exceeded"
            assert "--memory-budget" in err.value.body["message"]
        got = client.completions.create(model=MODEL, prompt=[5] * 8, max_tokens=2, temperature=0, stream=True)
        assert stream_text(got, chat=False)[1][-1].choices[0].finish_reason


def test_a_weight_file_changed_on_disk_fails_health_and_requests_with_503(pair, streaming_budget, tmp_path):
    """A streamed target refuses to read a weight file changed since it was loaded; the server then says
    so: 503 for every request, and /health 503 with the reason."""
    target = Path(shutil.copytree(pair["target"], tmp_path / "target"))

    def load():
        return LLMCad.from_pretrained(pair["draft"], target, memory_budget=streaming_budget)

    with running_server(load) as running:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "temperature": 0}
        assert running.post("/v1/completions", body).status_code == 200
        weights = target / "model.safetensors"
        stamp = weights.stat()
        os.utime(weights, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
        for request in (body, body, {**body, "stream": True}):
            r = running.post("/v1/completions", request)
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_failed", r.text
            assert "changed on disk" in r.json()["error"]["message"]
        health = httpx.get(running.url + "/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert "changed on disk" in health.json()["error"]


# ---------------------------------------------------------------- command line
def _cli_env():
    return child_env()


def test_the_core_does_not_import_the_server():
    code = ("import sys, llmcad, llmcad.cli, llmcad.engine; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('starlette', 'uvicorn', 'openai', 'httpx') "
            "or m.startswith('llmcad.serve')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], env=_cli_env(), check=True, timeout=60)


def test_cli_refuses_bad_arguments_and_a_missing_extra(capsys, monkeypatch):
    from llmcad.cli import main
    from llmcad.serve import command

    assert main(["serve", "--draft", "only-one"]) == 2
    assert "give both --draft and --target" in capsys.readouterr().err
    monkeypatch.setattr(command, "NEEDS", ("starlette", "no_such_module_llmcad"))
    assert main(["serve", "--draft", "a", "--target", "b"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "llmcad[serve]"' in err and "no_such_module_llmcad" in err


def test_cli_exits_2_when_the_models_cannot_load(pair, tmp_path, capsys):
    """A missing directory is refused before the server starts; weights that fail to load stop the
    server, which then exits 2 with the loader's message."""
    from llmcad.cli import main

    assert main(["serve", "--draft", str(tmp_path / "no-draft"), "--target", str(tmp_path / "no-target")]) == 2
    assert "llmcad: error:" in capsys.readouterr().err
    broken = pair_models.copy_with_tokenizer(pair["target"], tmp_path / "broken", pair_models.build_tokenizer(
        chat_template=pair_models.CHAT_TEMPLATE))
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["serve", "--draft", str(pair["draft"]), "--target", str(broken), "--port", "0",
                 "--log-level", "warning"]) == 2
    err = capsys.readouterr().err
    assert "llmcad: error:" in err and "model.safetensors" in err.splitlines()[-1], err


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 0), (signal.SIGHUP, 0), (signal.SIGINT, 130)],
                         ids=["sigterm", "sighup", "sigint"])
def test_cli_serves_then_stops_cleanly_on_a_signal(pair, reference, streaming_budget, sig, status):
    """`llmcad serve` in its own process, its API key from the environment: it answers, and a signal in
    the middle of a streamed generation ends the stream (an error event) and the process within seconds,
    without a traceback: SIGTERM and SIGHUP (a closed terminal) with status 0, Ctrl-C with 130."""
    argv = [*LLMCAD_WITH_SIGINT, "serve", "--draft", str(pair["draft"]), "--target",
            str(pair["target"]), "--port", "0", "--model-name", MODEL, "--memory-budget", str(streaming_budget),
            "--bandwidth-cap", str(SLOW_IO["bandwidth_cap"])]
    proc = subprocess.Popen(argv, env={**_cli_env(), "LLMCAD_API_KEY": API_KEY}, stderr=subprocess.PIPE, text=True)
    lines = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True)
    reader.start()
    try:
        log, url = [], None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not url:
            log.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
            url = (re.search(r"running on (http://\S+)", log[-1]) or [None, None])[1]
        assert url, "".join(log)
        while httpx.get(url + "/health", timeout=10).status_code != 200:  # 503 while the models load
            assert time.monotonic() < deadline and proc.poll() is None, "".join(log)
            time.sleep(0.05)
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
        client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=CLIENT_TIMEOUT_S)
        got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0)
        assert got.choices[0].text == reference.generate(PROMPT, N).text
        chunks = iter(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=200, temperature=0,
                                                stream=True))
        next(chunks)
        proc.send_signal(sig)
        with pytest.raises(openai.APIError, match="shutting down"):
            list(chunks)
        assert proc.wait(timeout=30) == status
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    proc.stderr.close()  # the pipe's reader is done (an open pipe would be a ResourceWarning)
    log += [lines.get_nowait() for _ in range(lines.qsize())]
    assert not any("Traceback" in line for line in log), "".join(log)
    assert any(f"{signal.Signals(sig).name}: stopping" in line for line in log), "".join(log)


# ---------------------------------------------------------------- prompt prefix cache
SYSTEM = {"role": "system", "content": "You write Python. Keep answers short and use type hints."}


@pytest.fixture(scope="module")
def fresh_reference(pair):
    """An engine that prefills every prompt from scratch: what reuse must reproduce."""
    with LLMCad.from_pretrained(pair["draft"], pair["target"], prefix_cache=False) as engine:
        yield engine


def test_clients_sharing_a_system_prompt_and_a_growing_conversation_reuse_the_prefix(pair, fresh_reference):
    from llmcad.speculative.prefix_cache import common_prefix

    with running_server(lambda: LLMCad.from_pretrained(pair["draft"], pair["target"])) as running:
        first, second = running.client(), running.client()
        one = [SYSTEM, {"role": "user", "content": "def add(a, b):"}]
        two = [SYSTEM, {"role": "user", "content": "for i in range(10):"}]
        replies = {}
        for name, client, messages in (("one", first, one), ("two", second, two)):
            got = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=N, temperature=0)
            assert got.choices[0].message.content == fresh_reference.generate(messages, N).text
            replies[name] = got
        shared = common_prefix(chat_ids(fresh_reference, one), chat_ids(fresh_reference, two))
        assert shared > 10  # the system turn and the user turn's opening
        assert replies["one"].usage.prompt_tokens_details.cached_tokens == 0
        assert replies["two"].usage.prompt_tokens_details.cached_tokens == shared
        # the first client's next turn reuses its whole conversation, though another client came between
        one += [{"role": "assistant", "content": replies["one"].choices[0].message.content},
                {"role": "user", "content": "The quick brown"}]
        got = first.chat.completions.create(model=MODEL, messages=one, max_tokens=N, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
        text, chunks = stream_text(got, chat=True)
        assert text == fresh_reference.generate(one, N).text
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= replies["one"].usage.prompt_tokens - 1


def test_a_server_without_the_prompt_cache_reports_no_cached_tokens(pair, fresh_reference):
    from llmcad.cli import Parser, open_engine
    from llmcad.serve import command

    parser = Parser(prog="llmcad serve")  # as the CLI builds `serve`'s own parser
    command.add_arguments(parser)
    args = parser.parse_args(["--draft", str(pair["draft"]), "--target", str(pair["target"]), "--no-prompt-cache"])
    assert args.prompt_cache is False and parser.parse_args([]).prompt_cache is True
    with running_server(lambda: open_engine(args)) as running:
        assert running.worker.engine.prefix_cache is None
        client = running.client()
        for _ in range(2):
            got = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=N, temperature=0)
            assert got.choices[0].message.content == fresh_reference.generate(MESSAGES, N).text
            assert got.usage.prompt_tokens_details.cached_tokens == 0
