"""Session fixtures: tiny random fp32 draft/target pairs of several HF families, saved to disk offline.

``tiny_pair_dirs(family)`` -> {"target", "same", "unrelated", "shared"} directories (see pair_models).
``tiny_models(family, kind)`` -> the loaded model (cached for the session).
"""
from __future__ import annotations

import os

import pytest

import pair_models  # tests/ is on sys.path: pytest puts a rootless conftest's directory there


def pytest_configure(config):
    """Each pytest-xdist worker and the processes it starts get an equal share of the cores for torch's
    intra-op threads. By default every worker runs one thread a core, so N workers oversubscribe the
    cores N times, and OpenMP's spinning threads then slow the suite about 3x on 2 cores. The count is
    pinned (OMP_NUM_THREADS) in every run, so that the engine's "auto" threads, which follow other
    processes' load, leave it as it is and a test's numbers do not depend on what else runs."""
    if "OMP_NUM_THREADS" in os.environ or _xdist_controller(config):
        return  # the user's count; or the controller, whose environment the workers inherit
    import torch

    from llmcad.cores import usable_cores

    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")))
    threads = max(1, min(torch.get_num_threads(), usable_cores() // workers))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def _xdist_controller(config) -> bool:
    """This process starts pytest-xdist workers (``-n N``, N > 0, or ``-n auto``) and runs no test."""
    return not hasattr(config, "workerinput") and getattr(config.option, "numprocesses", None) not in (None, 0)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return pair_models.build_tokenizer()


@pytest.fixture(scope="session")
def tiny_pair_dirs(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("tiny_pairs")
    built = {}

    def get(family: str) -> dict:
        if family not in built:
            built[family] = pair_models.build_family(root, family, tiny_tokenizer)
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_models(tiny_pair_dirs):
    from llmcad.models.loading import load_causal_lm

    loaded = {}

    def get(family: str, kind: str):
        path = tiny_pair_dirs(family)[kind]
        if path not in loaded:
            loaded[path] = load_causal_lm(path)
        return loaded[path]

    return get


@pytest.fixture(scope="session", autouse=True)
def _quiet_transformers():
    """No progress bars or info logs in test output (the CLI's own setting; the warning filter it also
    sets lives only as long as pytest's per-test warning context, so warnings still fail tests)."""
    from llmcad.cli import quiet_transformers

    quiet_transformers()
