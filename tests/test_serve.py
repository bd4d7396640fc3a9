"""`llmcad serve` with the official `openai` client against servers started here on 127.0.0.1 (a free
port), with the tiny llama pair and a chat template.

Every output is compared with ``engine.generate`` of a reference engine given the same parameters.
Every test runs under a time limit (SIGALRM), every client call has a timeout, and servers started
here must leave no thread behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

import llmcad
import pair_models
from child_cli import LLMCAD_WITH_SIGINT
from llmcad import LLMCad
from llmcad.errors import BudgetError, ModelLoadError
from llmcad.models.chat import chat_prompt_ids
from llmcad.serve.server import make_server
from llmcad.serve.textstream import TextStream, cut_at_stop, held_back
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
    with pytest.raises(BudgetError) as err:
        LLMCad.from_pretrained(pair["draft"], pair["target"], memory_budget=1)
    return int(re.search(r"needs at least [^(]*\((\d+) bytes\)", str(err.value)).group(1))


class Running:
    """A server on a thread: its worker, base URL and clients."""

    def __init__(self, server, worker, thread):
        self.server, self.worker, self.thread = server, worker, thread
        self.url = f"http://127.0.0.1:{server.port}"
        self.clients = []  # closed when the server stops (an open connection is a ResourceWarning)

    def client(self, timeout=CLIENT_TIMEOUT_S) -> openai.OpenAI:
        client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=timeout)
        self.clients.append(client)
        return client

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def post(self, path: str, content, **kw) -> httpx.Response:
        body = content if isinstance(content, (bytes, str)) else json.dumps(content)
        return httpx.post(self.url + path, content=body, headers={"content-type": "application/json"},
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
def running_server(load, max_queue=4, wait_ready=True):
    """Start a server (port 0: a free one) on a thread; on exit, stop it as a signal would and check its
    thread ended."""
    worker = GenerationWorker(load, max_queue)
    server = make_server(worker, MODEL, port=0, log_level="warning")
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "the server did not start"
    if wait_ready:
        assert worker.ready.wait(60) and worker.state == "ready", worker.load_error
    running = Running(server, worker, thread)
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

    before = server.wait_idle()["requests"]["finished"]
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


# ---------------------------------------------------------------- command line
def _cli_env():
    python_dir = Path(llmcad.__file__).resolve().parents[1]  # the llmcad under test
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(python_dir), os.environ.get("PYTHONPATH", "")])}


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


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 130)],
                         ids=["sigterm", "sigint"])
def test_cli_serves_then_stops_cleanly_on_a_signal(pair, reference, streaming_budget, sig, status):
    """`llmcad serve` in its own process: it answers, and a signal in the middle of a streamed generation
    ends the stream and the process within seconds, without a traceback."""
    argv = [*LLMCAD_WITH_SIGINT, "serve", "--draft", str(pair["draft"]), "--target",
            str(pair["target"]), "--port", "0", "--model-name", MODEL, "--memory-budget", str(streaming_budget),
            "--bandwidth-cap", str(SLOW_IO["bandwidth_cap"])]
    proc = subprocess.Popen(argv, env=_cli_env(), stderr=subprocess.PIPE, text=True)
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
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=CLIENT_TIMEOUT_S)
        got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0)
        assert got.choices[0].text == reference.generate(PROMPT, N).text
        chunks = iter(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=200, temperature=0,
                                                stream=True))
        next(chunks)
        proc.send_signal(sig)
        with contextlib.suppress(openai.APIError):
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
