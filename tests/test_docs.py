"""The documentation's examples run as written: every ```sh and ```python block of README.md and
docs/*.md, in page order, in a fresh folder whose model cache holds a tiny chat pair under the demo
pair's names (so `llmcad ...` with no paths, and the names `llmcad models` lists, work offline).

Blocks fenced ``text`` or ``console`` are output, recorded runs of the real pair, or commands for
hardware this test does not have (a GPU), and are not run. ``pip``/``apt-get``/``cmake``/``ctest``
lines are what `.ci/run` itself runs; a ``llmcad serve`` line runs in the background (its own block)
until the page ends, on a free port in place of the page's 8000.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import pair_models
from llmcad.models import fetch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
BLOCK = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
CI_ONLY = re.compile(r"^\s*(pip|python3? -m pip|apt-get|cmake|ctest) ")  # .ci/run runs these itself
RUNNABLE = ("sh", "bash", "python")
RUN_TIMEOUT_S = 600


def blocks(page: Path) -> list:
    """(language, code) of the page's runnable blocks, in order."""
    return [(lang, code) for lang, code in BLOCK.findall(page.read_text()) if lang in RUNNABLE]


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """A model cache whose demo pair is a tiny qwen2 pair with a chat template (hidden 128, so the
    default int4 group of 128 divides its linears)."""
    from llmcad.bench.tiny_pair import truncated_copy

    home = tmp_path_factory.mktemp("docs-home")
    tokenizer = pair_models.build_tokenizer(chat_template=pair_models.CHAT_TEMPLATE)
    target = pair_models.random_model("qwen2", seed=7, hidden=128, layers=4)
    for model, name in ((truncated_copy(target, 2), fetch.DRAFT.name), (target, fetch.TARGET.name)):
        model.config.max_position_embeddings = 2048  # the real pair's prompts (HumanEval) fit, as there
        pair_models.save(model, tokenizer, home / f"{name}-bfloat16")
    return home


def test_every_page_has_runnable_examples():
    """The pages this test runs are the ones the README links, and each shows something to run."""
    linked = set(re.findall(r"\(docs/([\w-]+\.md)\)", (ROOT / "README.md").read_text()))
    assert linked == {p.name for p in PAGES[1:]}
    assert [p.name for p in PAGES if not blocks(p)] == []


def test_readme_commands_are_ci_commands():
    """The README's install and test commands are the ones .ci/run runs."""
    first = blocks(ROOT / "README.md")[0][1]
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = re.search(r"python -m pytest[^\n&]*", first).group(0).strip()
    assert f"\n{test_command}\n" in ci
    assert 'pip install torch==2.13.0' in first and "pip install -q torch==2.13.0" in ci


def test_readme_stays_short():
    """The README is the front page (at most about 15 KB); the rest lives in docs/."""
    assert (ROOT / "README.md").stat().st_size <= 15_500


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_page_examples_run(page, demo_cache, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(demo_cache, home)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "LLMCAD_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("LLMCAD_API_KEY", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__import__("llmcad").__file__).parents[1]),
                                                    env.get("PYTHONPATH")) if p)
    port = _free_port()
    servers = []
    try:
        for n, (lang, code) in enumerate(blocks(page), 1):
            code = code.replace("8000", str(port))
            where = f"{page.name} block {n}"
            if lang == "python":
                _run([sys.executable, "-c", code], work, env, where, code)
            elif re.match(r"^\s*llmcad serve\b", code):
                assert len(code.strip().splitlines()) == 1, f"{where}: `llmcad serve` stands alone in its block"
                servers.append(_start_server(code.strip(), work, env, port, where))
            else:
                script = "\n".join(": run by .ci/run" if CI_ONLY.match(line) else line
                                   for line in code.replace("\\\n", " ").splitlines())
                _run(["bash", "-euo", "pipefail", "-c", script], work, env, where, code)
    finally:
        for server in servers:
            _stop(server)


def _run(cmd, cwd, env, where, code):
    done = subprocess.run(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, f"{where} failed ({done.returncode}):\n{code}\n--- stdout\n{done.stdout[-2000:]}" \
                                 f"\n--- stderr\n{done.stderr[-3000:]}"


def _start_server(line, cwd, env, port, where):
    with open(Path(cwd) / f"serve-{port}.log", "w") as log:  # the child holds its own descriptor
        server = subprocess.Popen(["bash", "-c", f"exec {line}"], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert server.poll() is None, f"{where}: the server exited:\n{(Path(cwd) / f'serve-{port}.log').read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(0.5)
    _stop(server)
    pytest.fail(f"{where}: the server was not ready within 300 s")


def _stop(server):
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
