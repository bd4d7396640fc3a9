"""The memory budget under the kernel: ``llmcad generate`` run in a fresh memory cgroup whose limit is
its ``--memory-budget`` completes with the target's own greedy tokens and is never OOM-killed, in every
mode, streamed and resident, with a 512-node tree, a 4k-token prompt and a 2k-token generation.

The tiny pair has a large vocabulary (its logits are what a full tree materialises) and a long
context. Budgets are the least the engine accepts (from its own refusal) plus 5%: the runtime floor
of Python and torch is most of it, as on a device.
"""
from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmcad.bench import cgroups
from pair_models import EOS_ID, LEAST_BUDGET, build_tokenizer
from child_cli import child_env

pytestmark = pytest.mark.skipif(cgroups.available() is not None, reason=str(cgroups.available()))

MiB = 2**20
VOCAB, HIDDEN, LAYERS = 32000, 256, 8  # 7 MiB a layer: 5% of a budget keeps only some resident
CONTEXT = 8192
PROMPT = "def add(a, b):\n    return a + b\n"
LONG_TOKENS = 4096


def _long_prompt(tokenizer) -> str:
    """A text of LONG_TOKENS tokens (BOS included) under ``tokenizer``."""
    words = [f"x{i % 97} y{i % 89}" for i in range(LONG_TOKENS)]
    lo, hi = 1, len(words)
    while lo < hi:  # the most words whose text stays within LONG_TOKENS tokens
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(tokenizer(" ".join(words[:mid]))["input_ids"]) <= LONG_TOKENS else (lo, mid - 1)
    text = " ".join(words[:lo])
    return text + " " * (LONG_TOKENS - len(tokenizer(text)["input_ids"]))


def _build(out: Path, seed: int, tokenizer) -> Path:
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2048, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=LAYERS, max_position_embeddings=CONTEXT,
                         bos_token_id=0, eos_token_id=EOS_ID, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # peaked distributions: the draft's trees grow deep, and few ties
        model.lm_head.weight[EOS_ID].fill_(0.0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("kernel_pair")
    tokenizer = build_tokenizer()
    target = _build(root / "target", seed=0, tokenizer=tokenizer)
    # the draft is the target: trees are accepted deep
    return {"target": target, "draft": target, "long_prompt": _long_prompt(tokenizer)}


def _argv(pair, prompt, max_new, mode="target-only", budget=None, extra=()):
    argv = [sys.executable, "-m", "llmcad.cli", "generate", "--draft", str(pair["draft"]), "--target",
            str(pair["target"]), "--mode", mode, "--prompt", prompt, "--max-new-tokens", str(max_new), "--json",
            *extra]
    return argv + (["--memory-budget", str(budget)] if budget is not None else [])


def _env():
    return child_env(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


@functools.lru_cache(maxsize=None)
def _least_of(argv: tuple) -> int:
    proc = subprocess.run(list(argv), capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    return int(re.search(LEAST_BUDGET, proc.stderr).group(1))


def _least(pair, prompt, max_new, mode, extra=()) -> int:
    """The least budget the engine accepts for this run: from its own refusal of 1 byte."""
    return _least_of(tuple(_argv(pair, prompt, max_new, mode, 1, extra)))


def _limited(pair, prompt, max_new, mode, budget, extra=()) -> dict:
    """Run generate in a fresh memory cgroup whose limit is its budget; the kernel's verdict and its JSON."""
    budget = budget // 4096 * 4096  # the kernel keeps a limit in whole pages
    result = cgroups.run_limited(_argv(pair, prompt, max_new, mode, budget, extra), memory_bytes=budget,
                                 env=_env(), timeout=1200)
    assert not result.oom_killed, f"OOM-killed at {budget / MiB:.0f} MiB: {result.stderr[-1500:]}"
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.memory_limit_bytes == budget
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["stats"]["peak_rss_bytes"] <= budget
    assert out["stats"]["memory_budget_bytes"] == budget
    return out


_references = {}


def _reference(pair, prompt, max_new) -> list:
    """The target's own greedy tokens: transformers' generate in this process, no budget, no cgroup."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = (prompt, max_new)
    if key not in _references:
        model = AutoModelForCausalLM.from_pretrained(pair["target"], dtype=torch.float32).eval()
        ids = torch.tensor([AutoTokenizer.from_pretrained(pair["target"])(prompt)["input_ids"]])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False)
        _references[key] = out[0, ids.shape[1]:].tolist()
    return _references[key]


def test_a_budget_below_the_floor_plus_the_least_plan_is_refused_naming_both(pair):
    proc = subprocess.run(_argv(pair, PROMPT, 4, budget="64MiB"), capture_output=True, text=True, env=_env(),
                          timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    message = proc.stderr.strip()
    assert re.search(r"runtime floor measured at start-up \((\d+\.\d) MiB", message), message
    floor = float(re.search(r"runtime floor measured at start-up \((\d+\.\d) MiB", message).group(1))
    assert 100 < floor < 2000  # Python + torch + transformers: hundreds of MiB
    assert "the least plan (" in message


@pytest.mark.parametrize("placement", ["streamed", "resident"])
@pytest.mark.parametrize("mode", ["target-only", "chain", "tree", "llmcad"])
def test_every_mode_fits_its_budget_under_the_kernel(pair, mode, placement):
    least = _least(pair, PROMPT, 24, mode)
    # resident: room for the largest passes and every target layer (8 of 7 MiB) as well
    budget = int(least * 1.05) if placement == "streamed" else least + 256 * MiB
    out = _limited(pair, PROMPT, 24, mode, budget)
    assert out["tokens"] == _reference(pair, PROMPT, 24)
    streamed = out["stats"]["streamed"]
    assert (streamed["streamed_layers"] > 0) == (placement == "streamed"), streamed


def test_a_512_node_tree_fits_under_the_kernel(pair):
    extra = ("--max-tree-tokens", "512", "--max-depth", "64")
    least = _least(pair, PROMPT, 64, "tree", extra)
    budget = least + 256 * MiB  # room for 512-row passes: two 64 MiB logits chunks and the activations
    out = _limited(pair, PROMPT, 64, "tree", budget, extra)
    assert out["tokens"] == _reference(pair, PROMPT, 64)
    assert out["stats"]["pass_rows"] == 512 and out["stats"]["max_tree_tokens"] == 512


def test_a_4k_token_prompt_fits_under_the_kernel(pair):
    """The least budget for a short prompt plus 512 MiB: the passes the plan then allows (512 rows), the
    layers it pins, and spare for the KV caches of the prompt's 4096 positions. Without passes of at
    most 512 rows, the prompt's one pass would hold a 4096 x 4096 mask and its activations."""
    prompt = pair["long_prompt"]
    least = _least(pair, PROMPT, 16, "llmcad")
    out = _limited(pair, prompt, 16, "llmcad", least + 512 * MiB)
    assert out["stats"]["prompt_tokens"] == LONG_TOKENS
    assert out["tokens"] == _reference(pair, prompt, 16)


def test_a_2k_token_generation_fits_under_the_kernel(pair):
    least = _least(pair, PROMPT, 2048, "llmcad")
    out = _limited(pair, PROMPT, 2048, "llmcad", least + 512 * MiB)  # as for the 4k prompt
    assert len(out["tokens"]) == 2048 and out["stats"]["stop_reason"] == "max_new_tokens"
    assert out["tokens"] == _reference(pair, PROMPT, 2048)


def test_serve_answers_four_concurrent_streams_under_the_kernel(pair):
    """`llmcad serve` inside a memory cgroup whose limit is its budget: four clients stream at once (the
    server queues them), each gets the target's own greedy text, and the kernel never kills it."""
    import threading

    import httpx

    from llmcad import LLMCad

    budget = (_least(pair, PROMPT, 24, "llmcad") + 128 * MiB) // 4096 * 4096
    argv = [sys.executable, "-m", "llmcad.cli", "serve", "--draft", str(pair["draft"]), "--target", str(pair["target"]),
            "--port", "0", "--model-name", "tiny", "--memory-budget", str(budget)]
    texts, errors = [], []

    def stream(url):
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "stream": True}
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as response:
                events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
            texts.append("".join(json.loads(e)["choices"][0]["text"] for e in events if e != "[DONE]"))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(repr(exc))

    with cgroups.started_limited(argv, memory_bytes=budget, env=_env(), stderr=subprocess.PIPE, text=True) as server:
        url = None
        for line in server.proc.stderr:
            if (found := re.search(r"running on (http://\S+)", line)):
                url = found.group(1)
                break
        assert url, "the server never said where it runs"
        drain = threading.Thread(target=lambda: [None for _ in server.proc.stderr], daemon=True)
        drain.start()  # a full pipe would block the server
        while httpx.get(url + "/health", timeout=30).status_code != 200:  # 503 while the models load
            assert server.proc.poll() is None, "the server exited while loading"
        clients = [threading.Thread(target=stream, args=(url,)) for _ in range(4)]
        for client in clients:
            client.start()
        for client in clients:
            client.join(900)
    drain.join(30)
    server.proc.stderr.close()
    assert not server.oom_killed, f"OOM-killed at {budget / MiB:.0f} MiB"
    assert server.memory_limit_bytes == budget and server.peak_bytes <= budget
    assert errors == []
    with LLMCad.from_pretrained(pair["draft"], pair["target"]) as engine:  # resident, no budget, no cgroup
        want = engine.generate(PROMPT, 24).text
    assert texts == [want] * 4
