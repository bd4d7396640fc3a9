"""Endurance: a 2,000-token generation in llmcad mode with every target layer streamed shows no
growth in RSS (beyond the KV caches, which grow by design), open file descriptors or threads after
warm-up. Tiny models with a 4,096-position context; EOS is ignored so the generation runs to the end.
The same measurement for any pair: benchmarks/endurance.py.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import pair_models


def _load_script(path: Path):
    """A script of the repository as a module, without touching sys.path."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


endurance = _load_script(Path(__file__).resolve().parents[1] / "benchmarks" / "endurance.py")

TOKENS = 2000
SLACK_BYTES = 16 << 20  # allocator noise; one leaked streamed layer per pass would be ~600 KB x ~900 passes


@pytest.fixture(scope="module")
def long_context_pair(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("endurance")
    target = pair_models.random_model("llama", seed=3)
    draft = pair_models.truncated_copy(target, 2)
    for model in (target, draft):
        model.config.max_position_embeddings = 4096  # rotary needs no change; the engine's room does
    return pair_models.save(draft, tiny_tokenizer, root / "draft"), pair_models.save(target, tiny_tokenizer,
                                                                                      root / "target")


def test_long_streamed_generation_leaks_nothing(long_context_pair):
    draft, target = long_context_pair
    budget = pair_models.least_budget(draft, target)
    report = endurance.run(draft, target, memory_budget=budget, tokens=TOKENS, warmup_fraction=0.1,
                           ignore_eos=True, prompt="def add(a, b):", sample_every=2)
    assert report["tokens"] == TOKENS and report["stop_reason"] == "max_new_tokens"
    assert report["samples"] >= 20  # a sample every 2 passes: the repeats of random text accept long runs
    assert report["fds_growth"] <= 0 and report["fds_max"] <= report["fds_after_warmup"], report
    # no growth; fewer is fine (e.g. tqdm's monitor thread from loading ends on its own)
    assert report["threads_end"] <= report["threads_after_warmup"], report
    assert report["threads_max"] <= report["threads_after_warmup"] + 1, report  # the verification worker
    assert report["rss_growth_bytes"] <= report["kv_growth_bytes"] + SLACK_BYTES, report


def test_many_engines_with_faults_leak_nothing(tiny_pair_dirs):
    """Engines in turn, each with one fault (EIO, Ctrl-C inside a pass, two threads, dropped without
    close()): every one ends as documented and answers exactly afterwards; nothing accumulates."""
    dirs = tiny_pair_dirs("llama")
    budget = pair_models.least_budget(dirs["shared"], dirs["target"])
    report = endurance.run_faults(dirs["shared"], dirs["target"], memory_budget=budget, engines=12)
    assert report["all_exact"], report
    assert report["fds_growth"] <= 0, report
    assert report["threads_growth"] <= 0, report
    assert report["rss_growth_bytes"] <= SLACK_BYTES, report
