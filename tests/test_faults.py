"""Faults while generating: a weight file truncated or changed after loading, EIO on the k-th
read, an exception inside the verification thread, KeyboardInterrupt in the middle of a streamed pass.

Each ends with an exception in the caller within seconds (a hang fails the test: generate runs on a
thread joined with a timeout, or under ``signal.alarm`` where the main thread is needed), every thread
the generation started is gone, the streamed layers hold no buffer views, and the engine generates
correctly again (or, after ``close()``, refuses with EngineClosedError).
"""
from __future__ import annotations

import _thread
import errno
import os
import re
import shutil
import signal
import threading
import time
from contextlib import contextmanager

import pytest
import torch

import pair_models
from child_cli import LLMCAD_WITH_SIGINT, child_env, interrupt_and_expect_clean_exit
from llmcad import LLMCad
from llmcad.errors import EngineClosedError, StreamerIOError, WeightFileError
from llmcad.streaming.streamed import decoder_layers

PROMPT = "def add(a, b):"
NEW_TOKENS = 10
SLOW_IO = {"bandwidth_cap": 4e6}  # bytes/s: a tiny layer takes tens of ms, so passes overlap with drafting
MODES = ["tree", "llmcad"]  # llmcad mode verifies on the pipeline's worker thread
DEADLINE_S = 60  # a generation that has not ended by then counts as hung


@pytest.fixture(scope="module")
def pair(tiny_pair_dirs, tmp_path_factory):
    """A private copy of the llama target (tests damage its weights) and the shared-layers draft."""
    dirs = tiny_pair_dirs("llama")
    target = shutil.copytree(dirs["target"], tmp_path_factory.mktemp("faults") / "target")
    return {"draft": dirs["shared"], "target": target}


@pytest.fixture(scope="module")
def setup(pair, tiny_models, tiny_tokenizer):
    """(budget streaming every target layer, prompt ids, the target's own greedy continuation)."""
    budget = pair_models.least_budget(pair["draft"], pair["target"])
    ids = tiny_tokenizer(PROMPT)["input_ids"]
    out = tiny_models("llama", "target").generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                                  dtype=torch.long), max_new_tokens=NEW_TOKENS, do_sample=False)
    return budget, ids, out[0, len(ids):].tolist()


@contextmanager
def streamed_engine(pair, setup, mode, **options):
    budget, _, _ = setup
    with LLMCad.from_pretrained(pair["draft"], pair["target"], memory_budget=budget, mode=mode, **options) as eng:
        assert eng.placement.resident_layers == [] and len(eng.placement.streamed_layers) == 4
        yield eng


def native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def generate_in_thread(engine, ids, **kwargs):
    """generate() on a thread joined with DEADLINE_S; returns (result or None, exception or None, seconds)."""
    outcome = {}

    def run():
        try:
            outcome["result"] = engine.generate(ids, NEW_TOKENS, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc

    t0 = time.monotonic()
    caller = threading.Thread(target=run, name="test-caller")
    caller.start()
    caller.join(timeout=DEADLINE_S)
    assert not caller.is_alive(), "generate() hung"
    return outcome.get("result"), outcome.get("error"), time.monotonic() - t0


def assert_clean(engine, before_threads, native_before):
    """Every Python and native thread the generation started has ended; no layer is bound to a buffer."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (set(threading.enumerate()) - before_threads
                                           or native_threads() > native_before):
        time.sleep(0.01)
    assert set(threading.enumerate()) - before_threads == set()
    assert native_threads() <= native_before
    layers = decoder_layers(engine.target)
    assert all(p.device.type == "meta" for i in engine.placement.streamed_layers for p in layers[i].parameters())
    assert engine.streamed._held is None


def baseline(engine, ids, want):
    """Warm the engine (torch's thread pools start on first use); returns the thread baselines."""
    assert engine.generate(ids, NEW_TOKENS).tokens == want
    return set(threading.enumerate()), native_threads()


@contextmanager
def alarm(seconds=DEADLINE_S):
    """Fail instead of hanging, for tests that must run generate on the main thread (signals)."""
    def timed_out(signum, frame):
        raise TimeoutError(f"no result within {seconds} s")

    old = signal.signal(signal.SIGALRM, timed_out)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------- weight files changed after loading
@contextmanager
def damaged(path, data: bytes):
    """Overwrite ``path`` in place (same inode) with ``data``; put the original bytes back afterwards."""
    original = path.read_bytes()
    with open(path, "r+b") as f:
        f.write(data)
        f.truncate(len(data))
    try:
        yield
    finally:
        with open(path, "r+b") as f:
            f.write(original)
            f.truncate(len(original))


def _truncated(original: bytes) -> bytes:
    return original[: len(original) // 3]


def _overwritten(original: bytes) -> bytes:
    """Same size, same header, other tensor bytes: read blindly, this would be a wrong answer."""
    header = 8 + int.from_bytes(original[:8], "little")
    return original[:header] + os.urandom(len(original) - header)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("damage", [_truncated, _overwritten], ids=["truncated", "overwritten"])
def test_weight_file_changed_in_place_after_loading(pair, setup, mode, damage):
    """An error naming the file, never a wrong answer; the target is then closed (its index is stale)."""
    _, ids, want = setup
    weights = pair["target"] / "model.safetensors"
    with streamed_engine(pair, setup, mode) as eng:
        threads, native = baseline(eng, ids, want)
        time.sleep(0.02)  # a later modification time than the load's, even with a coarse clock
        with damaged(weights, damage(weights.read_bytes())):
            result, error, seconds = generate_in_thread(eng, ids)
        assert isinstance(error, WeightFileError), (error, result)
        assert re.search(r"model\.safetensors: changed on disk after the model was loaded", str(error)), error
        assert seconds < 30
        assert_clean(eng, threads, native)
        with pytest.raises(EngineClosedError, match=r"closed after .*model\.safetensors changed on disk"):
            eng.generate(ids, NEW_TOKENS)


def test_weight_file_replaced_after_loading_keeps_reading_what_was_loaded(pair, setup):
    """Replacing the file (a new inode, e.g. a re-download) cannot change what the open engine reads."""
    _, ids, want = setup
    weights = pair["target"] / "model.safetensors"
    original = weights.read_bytes()
    with streamed_engine(pair, setup, "llmcad") as eng:
        replacement = weights.with_name("replacement.tmp")
        replacement.write_bytes(os.urandom(len(original)))
        os.replace(replacement, weights)
        try:
            assert eng.generate(ids, NEW_TOKENS).tokens == want
        finally:
            weights.write_bytes(original)


# ---------------------------------------------------------------- read errors
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [0, 2])
def test_eio_on_the_kth_read(pair, setup, mode, k):
    _, ids, want = setup
    with streamed_engine(pair, setup, mode, streamer_options=SLOW_IO) as eng:
        threads, native = baseline(eng, ids, want)
        ctl = eng.streamed
        ctl.drop_prefetch()
        ctl.streamer.inject_fault(k, errno.EIO)
        result, error, seconds = generate_in_thread(eng, ids)
        assert isinstance(error, StreamerIOError), (error, result)
        assert error.errno == errno.EIO and "model.safetensors" in str(error) and "offset" in str(error), error
        assert seconds < 30
        assert_clean(eng, threads, native)
        assert eng.generate(ids, NEW_TOKENS).tokens == want


# ---------------------------------------------------------------- exceptions in the verification thread
class OneShotHook:
    """A forward pre-hook on a target layer that runs ``action`` once and records the thread it ran on."""

    def __init__(self, module, action):
        self.action, self.thread = action, None
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        if self.thread is None:
            self.thread = threading.current_thread().name
            self.action()

    def remove(self):
        self.handle.remove()


def _raise(exc):
    def action():
        raise exc
    return action


def test_exception_inside_the_verification_thread(pair, setup):
    _, ids, want = setup
    with streamed_engine(pair, setup, "llmcad", streamer_options=SLOW_IO) as eng:
        threads, native = baseline(eng, ids, want)
        hook = OneShotHook(decoder_layers(eng.target)[2], _raise(RuntimeError("injected verification fault")))
        try:
            result, error, _ = generate_in_thread(eng, ids)
        finally:
            hook.remove()
        assert hook.thread.startswith("llmcad-verify"), hook.thread  # it did run on the worker
        assert isinstance(error, RuntimeError) and "injected verification fault" in str(error), (error, result)
        assert_clean(eng, threads, native)
        assert eng.generate(ids, NEW_TOKENS).tokens == want


# ---------------------------------------------------------------- KeyboardInterrupt
@pytest.mark.parametrize("mode", MODES)
def test_keyboard_interrupt_raised_inside_a_streamed_pass(pair, setup, mode):
    _, ids, want = setup
    with streamed_engine(pair, setup, mode, streamer_options=SLOW_IO) as eng:
        threads, native = baseline(eng, ids, want)
        hook = OneShotHook(decoder_layers(eng.target)[1], _raise(KeyboardInterrupt()))
        try:
            with alarm(), pytest.raises(KeyboardInterrupt):
                eng.generate(ids, NEW_TOKENS)
        finally:
            hook.remove()
        assert_clean(eng, threads, native)
        assert eng.generate(ids, NEW_TOKENS).tokens == want


@pytest.fixture
def sigint_raises():
    """SIGINT raises KeyboardInterrupt in this process for the test, whatever the suite was started
    with (under nohup or `&` it is ignored, and interrupt_main() then does nothing)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)



@pytest.mark.parametrize("mode", MODES)
def test_ctrl_c_in_the_middle_of_a_streamed_pass(pair, setup, mode, sigint_raises):
    """SIGINT semantics: the interrupt is delivered to the main thread (the caller) while a target layer
    is about to run (on the worker thread in llmcad mode); generate ends with KeyboardInterrupt."""
    _, ids, want = setup
    with streamed_engine(pair, setup, mode, streamer_options=SLOW_IO) as eng:
        threads, native = baseline(eng, ids, want)
        hook = OneShotHook(decoder_layers(eng.target)[2], _thread.interrupt_main)
        t0 = time.monotonic()
        try:
            with alarm(), pytest.raises(KeyboardInterrupt):
                eng.generate(ids, 4 * NEW_TOKENS)
        finally:
            hook.remove()
        assert hook.thread is not None and time.monotonic() - t0 < 30
        assert_clean(eng, threads, native)
        assert eng.generate(ids, NEW_TOKENS).tokens == want


# ---------------------------------------------------------------- closing
def test_close_releases_the_streamer_and_refuses_later_use(pair, setup):
    _, ids, want = setup
    native = native_threads()
    with streamed_engine(pair, setup, "llmcad", streamer_options=SLOW_IO) as eng:
        assert eng.generate(ids, NEW_TOKENS).tokens == want
        assert native_threads() > native  # the streamer's IO thread (at least)
    deadline = time.monotonic() + 10
    while native_threads() > native and time.monotonic() < deadline:
        time.sleep(0.01)
    assert native_threads() <= native, "threads left running after close()"
    eng.close()  # twice is fine
    with pytest.raises(EngineClosedError, match="closed"):
        eng.generate(ids, NEW_TOKENS)
    with pytest.raises(EngineClosedError, match="closed"), torch.no_grad():
        eng.target(input_ids=torch.tensor([ids]))


def test_ctrl_c_on_the_command_line_exits_130_quickly(pair, setup):
    """SIGINT to `llmcad generate` while it streams text: exit status 130 within seconds, no traceback
    (the verification worker and the streamer's IO thread do not keep the process alive)."""
    import subprocess

    budget, _, _ = setup
    env = child_env()
    argv = [*LLMCAD_WITH_SIGINT, "generate", "--draft", str(pair["draft"]), "--target",
            str(pair["target"]), "--prompt", PROMPT, "--max-new-tokens", "200", "--memory-budget", str(budget),
            "--bandwidth-cap", "2e6"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as proc:  # closes the pipes
        def streaming():  # generation is under way
            assert proc.stdout.read(1), "no text streamed before the interrupt"

        interrupt_and_expect_clean_exit(proc, DEADLINE_S, ready=streaming)
