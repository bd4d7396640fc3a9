"""What holds whatever happens around a loaded engine: weights it owns (a checkpoint truncated or edited
after loading changes nothing, and cannot kill the process), a streamed target that notices any edit
of its files, the checkpoint's dtype taken as HF takes it, KV caches bounded by the memory budget, an
engine dropped without close() that releases everything, generate calls from several threads, and
Ctrl-C that ends any mode within about a second even on storage reading 1 kB/s.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import pair_models
from child_cli import LLMCAD_AT_THE_LEAST_BUDGET, child_env, interrupt_and_expect_clean_exit
from llmcad import LLMCad
from llmcad.errors import BudgetError

PROMPT = "def add(a, b):"
NEW_TOKENS = 8
ENV = child_env()
MODES = ["target-only", "chain", "tree", "llmcad"]


@pytest.fixture(scope="module")
def pair(tiny_pair_dirs, tmp_path_factory):
    """Private copies (tests damage the files) of the llama target and its shared-layers draft."""
    dirs = tiny_pair_dirs("llama")
    root = tmp_path_factory.mktemp("guarantees")
    return {"draft": shutil.copytree(dirs["shared"], root / "draft"),
            "target": shutil.copytree(dirs["target"], root / "target")}


@pytest.fixture(scope="module")
def want(pair, tiny_models, tiny_tokenizer):
    ids = tiny_tokenizer(PROMPT)["input_ids"]
    out = tiny_models("llama", "target").generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                                  dtype=torch.long), max_new_tokens=NEW_TOKENS, do_sample=False)
    return ids, out[0, len(ids):].tolist()


def streaming_budget(draft, target) -> int:
    """The smallest budget the planner accepts: every target layer streamed."""
    return pair_models.least_budget(draft, target)


def run_script(body: str, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(body), *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=timeout)


def open_files(path) -> int:
    """Descriptors and mappings of this process on ``path``."""
    path = os.path.realpath(path)
    fds = sum(1 for fd in os.listdir("/proc/self/fd") if _link(f"/proc/self/fd/{fd}") == path)
    with open("/proc/self/maps") as f:
        maps = sum(1 for line in f if line.rstrip().endswith(path))
    return fds + maps


def _link(p):
    try:
        return os.readlink(p)
    except OSError:
        return None


def native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


# ---------------------------------------------------------------- weights the engine owns
OWNED = """
    import os, sys
    from llmcad import LLMCad
    draft, target, budget, mmap = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "mmap"
    files = [os.path.join(d, "model.safetensors") for d in (draft, target)]
    eng = LLMCad.from_pretrained(draft, target, memory_budget=None if budget == "none" else budget, mode="tree",
                                 **({"mmap": True} if mmap else {}))
    mapped = sum(1 for line in open("/proc/self/maps") for f in files if line.rstrip().endswith(f))
    before = after_truncation = eng.generate("def add(a, b):", 8).tokens
    for f in files:  # truncate, then fill with other bytes of the old size: neither may matter
        size = os.path.getsize(f)
        with open(f, "r+b") as fh:
            fh.truncate(size // 3)
        after_truncation = eng.generate("def add(a, b):", 8).tokens
        with open(f, "r+b") as fh:
            fh.write(os.urandom(size))
    after_edit = eng.generate("def add(a, b):", 8).tokens
    print(mapped, before == after_truncation == after_edit, flush=True)
"""


@pytest.mark.parametrize("budget", ["none", "1GiB"], ids=["resident", "budget-all-resident"])
def test_weights_changed_after_loading_change_nothing(pair, tmp_path, budget):
    """Draft and target weights are read, not mapped: truncating the files after loading (SIGBUS with
    mapped weights) or overwriting them leaves the outputs as they were."""
    draft, target = (shutil.copytree(pair[k], tmp_path / k) for k in ("draft", "target"))
    proc = run_script(OWNED, draft, target, budget, "owned")
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.split() == ["0", "True"], proc.stdout


def test_mmap_is_an_explicit_option(pair, tmp_path):
    """mmap=True maps the draft's and the resident target's files (and so shares their risk)."""
    draft, target = (shutil.copytree(pair[k], tmp_path / k) for k in ("draft", "target"))
    proc = run_script(OWNED.replace("for f in files:", "for f in []:"), draft, target, "none", "mmap")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["2", "True"], proc.stdout


def test_owned_loading_matches_transformers(pair, tiny_models):
    from llmcad.models.loading import load_causal_lm

    ours = load_causal_lm(pair["target"])
    ref = tiny_models("llama", "target")
    assert open_files(pair["target"] / "model.safetensors") == 0
    assert ours.generation_config.eos_token_id == ref.generation_config.eos_token_id
    ids = torch.tensor([[5, 9, 33, 7]])
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, ref(input_ids=ids).logits)


# ---------------------------------------------------------------- the streamed target notices edits
def test_streamed_file_edited_with_its_mtime_restored(pair, want, tmp_path):
    """Same size, same modification time, other bytes: the status-change time still tells."""
    from llmcad.errors import EngineClosedError, WeightFileError

    ids, expected = want
    target = shutil.copytree(pair["target"], tmp_path / "target")
    weights = target / "model.safetensors"
    with LLMCad.from_pretrained(pair["draft"], target, memory_budget=streaming_budget(pair["draft"], target),
                                mode="tree") as eng:
        assert eng.generate(ids, NEW_TOKENS).tokens == expected
        st = weights.stat()
        data = weights.read_bytes()
        header = 8 + int.from_bytes(data[:8], "little")
        time.sleep(0.02)
        with open(weights, "r+b") as f:
            f.seek(header)
            f.write(os.urandom(len(data) - header))
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
        with pytest.raises(WeightFileError, match=r"model\.safetensors: changed on disk after the model was loaded"):
            eng.generate(ids, NEW_TOKENS)
        with pytest.raises(EngineClosedError):
            eng.generate(ids, NEW_TOKENS)


# ---------------------------------------------------------------- dtype as HF picks and casts it
@pytest.fixture(scope="module")
def mixed_dtype(tmp_path_factory, tiny_tokenizer):
    """Norms stored in bf16, everything else fp32, config.json saying float32 (as HF writes it)."""
    from safetensors.torch import load_file, save_file

    path = pair_models.save(pair_models.random_model("llama", seed=7), tiny_tokenizer,
                            tmp_path_factory.mktemp("mixed") / "target")
    state = load_file(path / "model.safetensors")
    state = {k: v.to(torch.bfloat16) if "norm" in k else v for k, v in state.items()}
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_mixed_dtype_checkpoint_streams_exactly_like_transformers(mixed_dtype):
    from transformers import AutoModelForCausalLM

    from llmcad.streaming.budget import plan_placement
    from llmcad.streaming.streamed import load_streamed_target
    from llmcad.streaming.weights import load_index

    ref = AutoModelForCausalLM.from_pretrained(mixed_dtype).eval()
    assert ref.dtype == torch.float32
    index = load_index(mixed_dtype)
    placement = plan_placement(index, memory_budget="1GiB", max_resident_layers=1)
    streamed = load_streamed_target(mixed_dtype, placement=placement)
    try:
        assert streamed.model.dtype == torch.float32 and placement.streamed_layers
        ids = torch.tensor([[5, 9, 33, 7, 120]])
        with torch.no_grad():
            assert torch.equal(streamed.model(input_ids=ids).logits, ref(input_ids=ids).logits)
    finally:
        streamed.close()


def test_mixed_dtype_streamed_equals_resident_engine(mixed_dtype, tiny_pair_dirs):
    draft = tiny_pair_dirs("llama")["unrelated"]
    with LLMCad.from_pretrained(draft, mixed_dtype, mode="tree") as resident, \
            LLMCad.from_pretrained(draft, mixed_dtype, mode="tree",
                                   memory_budget=streaming_budget(draft, mixed_dtype)) as streamed:
        assert streamed.placement.streamed_layers
        assert streamed.generate(PROMPT, 16).tokens == resident.generate(PROMPT, 16).tokens


# ---------------------------------------------------------------- KV caches within the budget
def test_generation_stops_where_the_budget_leaves_no_kv_room(pair, tiny_models, monkeypatch):
    from llmcad.engine import _budgeted_kv_positions

    budget = streaming_budget(pair["draft"], pair["target"])
    with LLMCad.from_pretrained(pair["draft"], pair["target"], memory_budget=budget, mode="tree",
                                prefix_cache=False) as eng:  # the room patched below is the engine's own
        positions = _budgeted_kv_positions(eng.draft, eng.target, eng.placement)
        eng.eos_token_ids = set()  # run on until something else stops it
        monkeypatch.setattr(eng, "_draft_kv_positions", 80)  # as if the budget had room for 80 positions
        seen = []
        decoder = eng.target.get_decoder()  # llmcad runs the decoder and the head apart
        original = decoder.forward

        def forward(*args, **kwargs):
            out = original(*args, **kwargs)
            seen.append(out.past_key_values.get_seq_length())
            return out

        monkeypatch.setattr(decoder, "forward", forward)
        result = eng.generate(PROMPT, 200)
    assert positions is not None and positions >= 80
    assert result.stats["stop_reason"] == "memory_budget"
    assert 40 < len(result.tokens) < 80 and max(seen) <= 80, (len(result.tokens), max(seen))
    ids = torch.tensor([eng.tokenizer(PROMPT)["input_ids"]])
    ref = tiny_models("llama", "target").generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                                  max_new_tokens=len(result.tokens), eos_token_id=None)
    assert result.tokens == ref[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("mode, streamed, offsets", [
    ("llmcad", False, range(8, 41, 2)), ("llmcad", True, range(20, 41, 4)), ("tree", False, range(8, 41, 2)),
    ("chain", False, range(8, 41, 2)), ("target-only", False, range(8, 41, 2))])
def test_generation_stops_cleanly_wherever_the_kv_room_ends(pair, want, tiny_models, monkeypatch, mode, streamed,
                                                            offsets):
    """The KV room ending at many offsets (positions beyond the prompt) against the rounds' trees
    (best-first, paced, and with a streamed target provisional drafting in lockstep): a memory_budget
    stop at the last position, the target's own tokens, and neither cache ever past the room."""
    ids, _ = want
    ref = tiny_models("llama", "target").generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                                  dtype=torch.long), do_sample=False, max_new_tokens=60,
                                                  eos_token_id=None)[0, len(ids):].tolist()
    budget = streaming_budget(*pair.values()) if streamed else None
    with LLMCad.from_pretrained(pair["draft"], pair["target"], memory_budget=budget, mode=mode,
                                prefix_cache=False) as eng:  # the room patched below is the engine's own
        assert eng.pipeline == (mode == "llmcad") and bool(eng.streamed) == streamed
        eng.eos_token_ids = set()
        eng.pipeline_lockstep = True
        peak = {}
        for name, model in (("draft", eng.draft.get_decoder()), ("target", eng.target.get_decoder())):
            def forward(*args, _name=name, _original=model.forward, **kwargs):
                out = _original(*args, **kwargs)
                peak[_name] = max(peak.get(_name, 0), out.past_key_values.get_seq_length())
                return out

            monkeypatch.setattr(model, "forward", forward)
        for positions in (len(ids) + k for k in offsets):
            monkeypatch.setattr(eng, "_draft_kv_positions", positions)  # as if the budget left that many
            peak.clear()
            result = eng.generate(ids, 400)
            assert result.stats["stop_reason"] == "memory_budget", positions
            assert len(ids) + len(result.tokens) == positions + 1, positions
            assert result.tokens == ref[:len(result.tokens)], positions
            assert max(peak.values()) <= positions, (positions, peak)


def test_prompt_beyond_the_kv_room_is_a_budget_error(pair, monkeypatch):
    with LLMCad.from_pretrained(pair["draft"], pair["target"], memory_budget=streaming_budget(*pair.values()),
                                mode="tree") as eng:
        monkeypatch.setattr(eng, "_draft_kv_positions", 5)
        with pytest.raises(BudgetError, match=r"tokens leave no room to generate in the KV cache the memory budget "
                                              r"leaves \(5 positions per model\)"):
            eng.generate(PROMPT, 4)


# ---------------------------------------------------------------- lifetimes and threads
def test_engine_dropped_without_close_releases_files_and_threads(pair, want):
    import gc

    ids, expected = want
    weights = pair["target"] / "model.safetensors"
    gc.collect()
    threads = native_threads()
    eng = LLMCad.from_pretrained(pair["draft"], pair["target"], memory_budget=streaming_budget(*pair.values()),
                                 mode="llmcad", streamer_options={"bandwidth_cap": 4e6})
    assert eng.generate(ids, NEW_TOKENS).tokens == expected
    assert open_files(weights) >= 2  # the target's check descriptor and the streamer's
    del eng  # no close(), no gc.collect(): the finalizer runs when the last reference goes
    deadline = time.monotonic() + 10
    while (open_files(weights) or native_threads() > threads) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert open_files(weights) == 0
    assert native_threads() <= threads


@pytest.mark.parametrize("mode", ["tree", "llmcad"])
def test_generate_from_two_threads_on_one_engine(pair, want, mode):
    """Calls from several threads run one after the other; each gets the exact answer."""
    ids, expected = want
    with LLMCad.from_pretrained(pair["draft"], pair["target"], memory_budget=streaming_budget(*pair.values()),
                                mode=mode, streamer_options={"bandwidth_cap": 4e6}) as eng:
        results, errors = [], []

        def run():
            try:
                results.append(eng.generate(ids, NEW_TOKENS).tokens)
            except BaseException as exc:  # noqa: BLE001 - the test inspects it
                errors.append(exc)

        callers = [threading.Thread(target=run) for _ in range(3)]
        for t in callers:
            t.start()
        for t in callers:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in callers), "generate hung"
        assert errors == [] and results == [expected] * 3


def run_in_thread(call, timeout=120) -> dict:
    """``call()`` on a daemon thread: {"value": ...} or {"error": ...}; {"hung": True} past ``timeout``."""
    outcome = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    return {"hung": True} if thread.is_alive() else outcome


def test_generate_from_its_own_streamer_is_refused(pair, want):
    """A streamer callback that calls generate() on the same engine would wait for itself: it gets
    EngineBusyError at once, and the outer generation goes on exactly."""
    from llmcad.errors import EngineBusyError

    ids, expected = want
    eng = LLMCad.from_pretrained(pair["draft"], pair["target"], mode="tree")  # no `with`: a hang keeps the lock
    refused = []

    def streamer(text):
        try:
            eng.generate(ids, 2)
        except EngineBusyError as exc:
            refused.append(str(exc))

    outcome = run_in_thread(lambda: eng.generate(ids, NEW_TOKENS, streamer=streamer).tokens)
    assert outcome == {"value": expected}
    assert refused and all("from inside this engine's own generation" in m for m in refused)
    assert eng.generate(ids, NEW_TOKENS).tokens == expected
    eng.close()


@pytest.mark.parametrize("mode", ["target-only", "llmcad"])
def test_close_from_another_thread_during_a_pass(pair, want, mode):
    """close() while a streamed pass waits for a layer: the generation ends with EngineClosedError (not
    an error of half-released weights), close() returns after it, and the files are released."""
    from llmcad.errors import EngineClosedError

    ids, _ = want
    weights = pair["target"] / "model.safetensors"
    eng = LLMCad.from_pretrained(pair["draft"], pair["target"], memory_budget=streaming_budget(*pair.values()),
                                 mode=mode, streamer_options={"bandwidth_cap": 4e6})
    eng.eos_token_ids = set()
    first, passes, closer = eng.placement.streamed_layers[0], [], []

    def before(layer):  # in the third pass, right before its first streamed layer is acquired
        if layer == first and len(passes) < 3:
            passes.append(layer)
            if len(passes) == 3:
                closer.append(threading.Thread(target=eng.close, daemon=True))
                closer[0].start()
                closer[0].join(timeout=1.0)  # returns at once if close() does not wait for the generation

    eng.streamed.watch_acquire(before, lambda layer: None)
    outcome = run_in_thread(lambda: eng.generate(ids, 200))
    assert isinstance(outcome.get("error"), EngineClosedError), outcome
    closer[0].join(timeout=60)
    assert not closer[0].is_alive()
    assert open_files(weights) == 0
    with pytest.raises(EngineClosedError, match="closed"):
        eng.generate(ids, NEW_TOKENS)


def test_close_from_a_streamer_callback(pair, want):
    """close() from the generating thread's own callback: the generation ends with EngineClosedError at
    its next round (close() cannot wait for the generation it runs in)."""
    from llmcad.errors import EngineClosedError

    ids, _ = want
    eng = LLMCad.from_pretrained(pair["draft"], pair["target"], mode="tree")
    eng.eos_token_ids = set()
    outcome = run_in_thread(lambda: eng.generate(ids, 200, streamer=lambda text: eng.close()))
    assert isinstance(outcome.get("error"), EngineClosedError), outcome


# ---------------------------------------------------------------- Ctrl-C at any storage speed
CTRL_C = """
    import os, signal, sys, threading, time
    from llmcad import LLMCad
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if the suite runs with SIGINT ignored
    import re
    from llmcad.errors import BudgetError
    draft, target, mode = sys.argv[1], sys.argv[2], sys.argv[4]
    try:  # this process's least budget: every layer streams (the runtime floor is the process's own)
        LLMCad.from_pretrained(draft, target, memory_budget=1)
    except BudgetError as err:
        budget = int(re.search(r"needs at least [^(]*\\((\\d+) bytes\\)", str(err)).group(1))
    eng = LLMCad.from_pretrained(draft, target, memory_budget=budget, mode=mode.replace("-while-drafting", ""),
                                 streamer_options={"bandwidth_cap": 1e3})  # 1 kB/s: a layer takes minutes
    threads = threading.active_count()
    sent = []

    def interrupt():
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    def while_drafting(*args):  # a provisional draft step: the verification thread waits for a read
        if not sent and any(t.name.startswith("llmcad-verify") for t in threading.enumerate()):
            interrupt()
            time.sleep(0.1)

    if mode.endswith("-while-drafting"):
        eng.draft.get_decoder().register_forward_hook(while_drafting)  # the head runs apart
    else:
        threading.Timer(1.0, interrupt).start()
    try:
        eng.generate("def add(a, b):", 10)
        print("finished?!")
    except KeyboardInterrupt:
        waited = time.monotonic() - sent[0]
        time.sleep(0.2)  # the timer thread ends
        print(f"{waited:.2f}", threading.active_count() <= threads, flush=True)
"""


@pytest.mark.parametrize("mode", MODES + ["llmcad-while-drafting"])
def test_ctrl_c_while_waiting_on_slow_storage_api(pair, mode):
    proc = run_script(CTRL_C, pair["draft"], pair["target"], "least", mode, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    waited, no_threads_left = proc.stdout.split()
    assert float(waited) < 2.0 and no_threads_left == "True", proc.stdout  # about 50 ms on an idle machine


@pytest.mark.parametrize("mode", ["target-only", "llmcad"])
def test_ctrl_c_while_waiting_on_slow_storage_cli(pair, mode):
    weights = os.path.realpath(pair["target"] / "model.safetensors")
    argv = [*LLMCAD_AT_THE_LEAST_BUDGET, "generate", "--draft", str(pair["draft"]), "--target",
            str(pair["target"]), "--prompt", PROMPT, "--max-new-tokens", "10", "--mode", mode,
            "--bandwidth-cap", "1000"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV) as proc:
        _interrupt_when_loaded(proc, weights)


def _interrupt_when_loaded(proc, weights) -> None:
    def loaded():  # the streamed target is loaded: its reads begin
        deadline = time.monotonic() + 60
        while not _holds(proc.pid, weights):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        time.sleep(1.0)

    interrupt_and_expect_clean_exit(proc, 30, ready=loaded)


def _holds(pid: int, path: str) -> bool:
    try:
        return any(_link(f"/proc/{pid}/fd/{fd}") == path for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False
