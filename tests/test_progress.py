"""What a long step shows on stderr: the step line, and the first pass's layer line that the first
text clears."""
from __future__ import annotations

import io
import time

from llmcad import LLMCad
from llmcad.progress import FirstPassProgress, step
from pair_models import least_budget


def test_a_step_off_a_terminal_prints_its_start_and_end_lines():
    out = io.StringIO()
    with step("llmcad: loading the models", file=out):
        pass
    lines = out.getvalue().splitlines()
    assert lines[0] == "llmcad: loading the models ..." and lines[1].startswith("llmcad: loading the models: done in")


def test_the_first_pass_shows_the_layer_it_reads_until_the_first_text(tiny_pair_dirs):
    dirs = tiny_pair_dirs("llama")
    budget = least_budget(dirs["shared"], dirs["target"])  # every target layer streams
    with LLMCad.from_pretrained(dirs["shared"], dirs["target"], memory_budget=budget) as engine:
        layers = len(engine.streamed.layers)
        assert len(engine.streamed.placement.streamed_layers) == layers
        line, texts, at_first_text = io.StringIO(), [], []

        def write(text):
            if not at_first_text:
                at_first_text.append(line.getvalue())
            texts.append(text)

        progress = FirstPassProgress(engine.streamed, file=line)
        engine.generate("def add(a, b):", 8, streamer=progress.writer(write))
        progress.close()
    assert texts
    shown = at_first_text[0]
    assert f"llmcad: reading the target: layer {layers}/{layers}" in shown
    assert all(f"layer {i}/{layers}" in shown for i in range(1, layers + 1))
    assert line.getvalue().count(f"layer {layers}/{layers}") == shown.count(f"layer {layers}/{layers}")  # cleared


def test_without_streamed_layers_the_first_pass_line_names_the_prompt_and_its_time_ticks():
    """A resident target binds no layer: the line still says what runs, and its elapsed time is redrawn
    between events, so a long first pass never looks frozen."""
    line = io.StringIO()
    progress = FirstPassProgress(None, file=line, interval=0.01)
    time.sleep(0.2)
    shown = line.getvalue()
    texts = []
    progress.writer(texts.append)("hi")
    assert texts == ["hi"] and shown.count("llmcad: reading the prompt") >= 5
    size = len(line.getvalue())
    time.sleep(0.05)
    assert len(line.getvalue()) == size  # closed by the first text: no more redraws
