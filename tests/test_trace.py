"""llmcad.trace: the timeline is valid Chrome trace-event JSON with the four lanes; trace-plot draws it."""
from __future__ import annotations

import json

import pytest

from llmcad import cli
from llmcad.engine import LLMCad
from llmcad.trace import LANES, Tracer
from test_pipeline import PROMPT, budgets, smallest_streaming_budget  # noqa: F401 (fixture)

LANE_NAMES = {"IO", "target compute", "draft", "verify/commit"}


def by_lane(events):
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    lanes = {name: [] for name in names.values()}
    for e in events:
        if e["ph"] == "X":
            lanes[names[e["tid"]]].append(e)
    return lanes


def test_tracer_writes_chrome_trace_events(tmp_path):
    tracer = Tracer()
    t = tracer.now()
    tracer.add("io", "read L3", t, t + 0.002, layer=3)
    with tracer.span("draft", "draft"):
        pass
    with pytest.raises(ValueError, match="lane"):
        tracer.add("gpu", "x", t, t)
    tracer.write(tmp_path / "t.json")
    data = json.loads((tmp_path / "t.json").read_text())
    events = data["traceEvents"]
    assert {e["args"]["name"] for e in events if e["name"] == "thread_name"} == LANE_NAMES
    spans = [e for e in events if e["ph"] == "X"]
    assert [e["name"] for e in spans] == ["read L3", "draft"]
    io = spans[0]
    assert io["tid"] == LANES["io"][0] and io["dur"] == pytest.approx(2000, abs=1) and io["args"] == {"layer": 3}
    assert all(e["ts"] >= 0 and e["dur"] >= 0 and e["pid"] == 1 for e in spans)


def test_generate_trace_has_every_lane_and_draft_fills_io_waits(tiny_pair_dirs, budgets, tmp_path):  # noqa: F811
    dirs = tiny_pair_dirs("qwen2")
    path = tmp_path / "timeline.json"
    with LLMCad.from_pretrained(dirs["shared"], dirs["target"], memory_budget=budgets("qwen2", "shared"),
                                streamer_options={"bandwidth_cap": 2e6}) as engine:
        engine.pipeline_lockstep = True  # deterministic: each verification drafts provisionally
        result = engine.generate(PROMPT, max_new_tokens=8, trace=str(path))
        streamed = engine.placement.streamed_layers
    lanes = by_lane(json.loads(path.read_text())["traceEvents"])
    assert set(lanes) == LANE_NAMES
    passes = result.stats["target_passes"]
    reads = [e for e in lanes["IO"] if e["name"].startswith("read L")]
    assert len(reads) >= passes * len(streamed)  # every streamed layer of every pass was read
    assert {e["args"]["layer"] for e in reads} == set(streamed)
    layers = [e for e in lanes["target compute"] if e["name"].startswith("L")]
    # every pass computes every streamed layer; a prompt longer than the budget's largest pass is cached
    # in passes of its own first
    assert len(layers) >= passes * len(streamed) and len(layers) % len(streamed) == 0
    assert sum(e["name"] == "verify" for e in lanes["verify/commit"]) == passes
    assert {"accept", "commit"} <= {e["name"] for e in lanes["verify/commit"]}
    provisional = [e for e in lanes["draft"] if e["name"] == "provisional"]
    # one span a provisional draft forward; forwards add more nodes than they are (best-first: a run candidate
    # and its top tokens; a verified node's tokens join the tree when a later forward runs them)
    assert 0 < len(provisional) <= result.stats["provisional_drafted"]
    assert len(lanes["draft"]) == result.stats["draft_steps"]
    # provisional steps run inside verifications and never overlap a target layer's compute
    verifies = [(e["ts"], e["ts"] + e["dur"]) for e in lanes["verify/commit"] if e["name"] == "verify"]
    for step in provisional:
        assert any(a <= step["ts"] and step["ts"] + step["dur"] <= b + 1 for a, b in verifies)
        for layer in layers:
            assert step["ts"] + step["dur"] <= layer["ts"] + 1 or layer["ts"] + layer["dur"] <= step["ts"] + 1


def test_trace_plot_renders_a_png(tiny_pair_dirs, budgets, tmp_path, capsys):  # noqa: F811
    dirs = tiny_pair_dirs("llama")
    trace, png = tmp_path / "t.json", tmp_path / "timeline.png"
    assert cli.main(["generate", "--draft", str(dirs["shared"]), "--target", str(dirs["target"]), "--prompt", PROMPT,
                     "--max-new-tokens", "6", "--memory-budget", str(budgets("llama", "shared")),
                     "--bandwidth-cap", "4e6", "--json", "--trace", str(trace)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stats"]["pipeline"] is True
    assert set(by_lane(json.loads(trace.read_text())["traceEvents"])) == LANE_NAMES
    assert cli.main(["trace-plot", str(trace), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert cli.main(["trace-plot", str(bad), "-o", str(png)]) == 2
    assert "not a readable trace JSON" in capsys.readouterr().err
