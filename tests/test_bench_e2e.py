"""``llmcad bench e2e`` plumbing on tiny fp32 fixture models (nothing downloads), plus its pure parts."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from llmcad import cli

from llmcad.bench import e2e as bench_e2e

from llmcad.bench import report as bench_report

from llmcad.bench import pagecache
from llmcad.bench import quant_rows as bench_quant_rows
from llmcad.bench.tiny_pair import PROMPTS, build_tiny_pair

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAIN_NAMES = ["target-only", "chain", "tree", "llmcad-paper", "llmcad", "hf-offload", "hf-assisted-offload"]


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    return build_tiny_pair(tmp_path_factory.mktemp("tiny_e2e"))


@pytest.fixture(scope="module")
def main_run(tiny_pair, tmp_path_factory):
    """One tiny run of every main row, in this process (fast); test_rows_run_in_fresh_processes covers children."""
    draft, target = tiny_pair
    out = tmp_path_factory.mktemp("e2e_out")
    argv = ["bench", "e2e", "--tiny", "--draft", str(draft), "--target", str(target), "--out", str(out),
            "--chain-k", "2,3", "--max-new-tokens", "8", "--warmup-tokens", "2", "--in-process"]
    rc = cli.main(argv)
    return rc, out, json.loads((out / "e2e.json").read_text())


def test_main_rows_complete_and_schema(main_run):
    rc, out, report = main_run
    assert rc == 0, [r.get("error") for r in report["rows"]]
    assert isinstance(report["command"], str) and isinstance(report["machine"], dict)
    assert report["machine"]["cpu_capability"] in (out / "e2e.md").read_text()
    assert [r["name"] for r in report["rows"]] == MAIN_NAMES
    for row in report["rows"]:
        assert set(bench_report.JSON_KEYS) <= set(row), row["name"]
        assert row["setting"] == "native"
        assert row["error"] is None
        assert row["tokens_per_s"] > 0 and row["peak_rss_bytes"] > 0
        assert 0 < row["first_pass_s"] < row["seconds"], row["name"]  # one prompt pass per prompt, timed
        assert row["decode_tokens_per_s"] > 0, row["name"]
        assert len(row["tokens"]) == len(PROMPTS)


def test_baseline_ratio_and_fp32_agreement_exact(main_run):
    _, _, report = main_run
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["target-only"]["ratio_vs_target_only"] == 1.0
    assert rows["target-only"]["tokens_per_pass"] == 1.0
    for name in MAIN_NAMES:  # fp32 greedy: every row says exactly what the target says
        assert rows[name]["agreement"] == 1.0, name
        assert rows[name]["tokens"] == rows["target-only"]["tokens"], name
    assert rows["hf-offload"]["tokens_per_pass"] == 1.0


def test_streamed_bytes_match_placement(main_run, tiny_pair):
    """The budget streams the target: each llmcad row reads bytes_per_pass per target pass, and whole
    rows of the embedding (read by rows, beside the layers)."""
    from llmcad.streaming.weights import load_index

    embed = load_index(tiny_pair[1]).embedding
    row_bytes = embed.length // embed.shape[0]
    _, _, report = main_run
    for row in report["rows"][:3]:
        placement = row["placement"]
        assert placement["streamed_layers"] > 0, row["name"]
        rows_read = row["bytes_read"] - placement["bytes_per_pass"] * row["target_passes"]
        assert rows_read >= 0 and rows_read % row_bytes == 0, row["name"]
        assert row["bytes_per_token"] == pytest.approx(row["bytes_read"] / row["generated_tokens"])


def test_chain_is_the_fastest_of_the_sweep(main_run):
    _, _, report = main_run
    sweep = report["chain_sweep"]["native"]
    assert sorted(s["chain_length"] for s in sweep) == [2, 3]
    chain = next(r for r in report["rows"] if r["name"] == "chain")
    assert chain["tokens_per_s"] == max(s["tokens_per_s"] for s in sweep)
    assert chain["options"]["chain_length"] in (2, 3)


def test_peers_offload_to_disk_and_evictor_checked(main_run):
    _, _, report = main_run
    for row in report["rows"]:
        assert row["evictor"]["evictions"] > row["target_passes"], row["name"]  # each forward, and each prompt
        assert row["evictor"]["fincore_samples"] > 0
    for row in [r for r in report["rows"] if r["name"].startswith("hf-")]:
        assert row["placement"]["device_map"].get("disk", 0) > 0, row["name"]
    assert "fincore" in report["workloads"]["native"]["page_cache"]


def test_the_rows_say_what_the_beside_compute_rule_decided(main_run):
    """Drafting beside the target's compute moves a row's speed between runs: the row records the rule's
    last state, how the draft's output layer was held and the threads, and the report's time line says them."""
    _, out, report = main_run
    llmcad = next(r for r in report["rows"] if r["name"] == "llmcad")
    mode = llmcad["beside_compute"]["mode"]
    assert mode in ("probe", "on", "off") and llmcad["beside_compute"]["probe_passes"] >= 0
    assert llmcad["draft_head"] == "float"  # the tiny float draft keeps its float head
    threads = llmcad["cpu_threads"]
    assert threads["threads"] == 1 and threads["draft_alone"] >= 1  # --tiny runs one thread
    lines = (out / "e2e.md").read_text().splitlines()
    assert any(line.startswith("- time of llmcad (native)") and f"draft beside compute: {mode}" in line
               and "draft head float" in line and ", threads 1" in line for line in lines)


def test_markdown_and_plots(main_run):
    _, out, report = main_run
    text = (out / "e2e.md").read_text()
    assert text.splitlines()[2:4] == ["```", report["command"]]  # the command opens the file
    for name in MAIN_NAMES:
        assert f"| {name} |" in text
    plots = sorted(out.glob("e2e_*.png"))
    assert {p.name for p in plots} >= {"e2e_tokens_per_s.png", "e2e_speedup.png"}
    for p in plots:
        assert p.read_bytes()[:8] == PNG_MAGIC


def test_rows_run_in_fresh_processes(tiny_pair, tmp_path):
    draft, target = tiny_pair
    argv = ["bench", "e2e", "--tiny", "--draft", str(draft), "--target", str(target), "--out", str(tmp_path),
            "--rows", "target-only", "--max-new-tokens", "4", "--warmup-tokens", "1"]
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "e2e.json").read_text())
    assert report["workloads"]["native"]["isolation"].startswith("one fresh process per row")
    assert [(r["name"], r["error"], r["agreement"]) for r in report["rows"]] == [("target-only", None, 1.0)]
    assert report["rows"][0]["peak_rss_bytes"] > 0


def test_capped_setting_runs_llmcad_rows_only(tiny_pair, tmp_path):
    draft, target = tiny_pair
    argv = ["bench", "e2e", "--tiny", "--draft", str(draft), "--target", str(target), "--out", str(tmp_path),
            "--rows", "target-only,llmcad", "--max-new-tokens", "6", "--warmup-tokens", "2",
            "--cap", "5MB/s", "--only-cap", "--evict-interval-ms", "0", "--in-process"]
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "e2e.json").read_text())
    assert [(r["name"], r["setting"]) for r in report["rows"]] == [("target-only", "cap5"), ("llmcad", "cap5")]
    assert report["bandwidth"]["floor_bps"]["cap5"] <= 5e6
    capped = {r["name"]: r for r in report["rows"] if r["setting"] == "cap5"}
    assert capped["llmcad"]["agreement"] == 1.0
    # the cap is applied: a capped pass takes about its bytes / 5 MB/s (the bucket allows 20 ms bursts);
    # uncapped, these reads would take a few percent of the floor
    assert capped["target-only"]["floor_ratio"] >= 0.8


# ---------------------------------------------------------------- pure parts
def test_agreement_counts_positions_past_the_shorter_output():
    assert bench_report.agreement([[1, 2, 3]], [[1, 2, 3]]) == 1.0
    assert bench_report.agreement([[1, 9, 3], [4]], [[1, 2, 3], [4, 5]]) == pytest.approx(3 / 5)
    assert bench_report.agreement([[]], [[]]) is None


def test_summarize_io_floor_hand_worked():
    raw = {"name": "llmcad", "setting": "native", "generated": 20, "seconds": 10.0, "passes": 5,
           "bytes_read": 5 * 400_000_000, "peak_rss_bytes": 1, "first_pass_s": 2.0, "first_pass_tokens": 4}
    row = bench_report.summarize(raw, bandwidth_bps=2e9)
    assert row["tokens_per_s"] == 2.0 and row["tokens_per_pass"] == 4.0
    assert row["bytes_per_token"] == 100_000_000
    # floor: (400 MB per pass / 2 GB/s) / 4 tokens per pass = 0.05 s/token; achieved 0.5 s/token
    assert row["floor_s_per_token"] == pytest.approx(0.05)
    assert row["floor_ratio"] == pytest.approx(10.0)
    assert row["decode_tokens_per_s"] == pytest.approx((20 - 4) / (10.0 - 2.0))
    assert row["provisional"]["reuse"] is None
    raw.update(provisional_drafted=50, provisional_followed=40, provisional_reused=10, provisional_dropped=30)
    assert bench_report.summarize(raw, bandwidth_bps=2e9)["provisional"] == {
        "drafted": 50, "followed": 40, "reused": 10, "dropped": 30, "reuse": 0.25}


def test_compare_against_baseline_of_the_same_setting():
    rows = [{"name": "target-only", "setting": "native", "tokens_per_s": 2.0},
            {"name": "llmcad", "setting": "native", "tokens_per_s": 6.0},
            {"name": "target-only", "setting": "cap300", "tokens_per_s": 1.0},
            {"name": "llmcad", "setting": "cap300", "tokens_per_s": 7.0}]
    tokens = {("target-only", "native"): [[1, 2]], ("llmcad", "native"): [[1, 3]],
              ("target-only", "cap300"): [[1, 2]], ("llmcad", "cap300"): [[1, 2]]}
    bench_report.compare(rows, tokens)
    assert [r["ratio_vs_target_only"] for r in rows] == [1.0, 3.0, 1.0, 7.0]
    assert [r["agreement"] for r in rows] == [1.0, 0.5, 1.0, 1.0]


def test_compare_a_quantized_row_against_target_only_on_the_same_weights():
    rows = [{"name": "target-only-int4", "setting": "s", "quantize": "int4", "tokens_per_s": 2.0},
            {"name": "llmcad-int4", "setting": "s", "quantize": "int4", "tokens_per_s": 6.0},
            {"name": "llama.cpp", "setting": "s", "tokens_per_s": 8.0}]
    tokens = {("target-only-int4", "s"): [[1, 2]], ("llmcad-int4", "s"): [[1, 2]], ("llama.cpp", "s"): [[1, 3]]}
    bench_report.compare(rows, tokens)
    # no bf16 target-only row: the setting's only target-only row is every row's reference
    assert [r["ratio_vs_target_only"] for r in rows] == [1.0, 3.0, 4.0]
    assert [r["agreement"] for r in rows] == [1.0, 1.0, 0.5]
    assert [r["baseline"] for r in rows] == ["target-only-int4"] * 3
    rows += [{"name": "target-only", "setting": "s", "tokens_per_s": 1.0}]
    tokens[("target-only", "s")] = [[1, 3]]
    bench_report.compare(rows, tokens)
    assert [r["baseline"] for r in rows] == ["target-only-int4", "target-only-int4", "target-only", "target-only"]
    assert rows[1]["ratio_vs_target_only"] == 3.0 and rows[2]["agreement"] == 1.0


def test_a_resident_target_has_no_io_floor():
    raw = {"name": "llmcad-int4", "setting": "s", "generated": 10, "seconds": 2.0, "passes": 2,
           "bytes_read": 80_000, "placement": {"streamed_layers": 0, "resident_layers": 28}}
    assert bench_report.summarize(raw, bandwidth_bps=1e9)["floor_ratio"] is None
    raw["placement"] = {"streamed_layers": 27, "resident_layers": 1}
    raw["bytes_read"] = 2_000_000_000
    assert bench_report.summarize(raw, bandwidth_bps=1e9)["floor_ratio"] == 1.0


def test_a_peer_that_holds_its_weights_has_no_io_floor():
    # llama.cpp's mmap: 86 KB of page faults over 10 tokens in 2 s, against 1 GB/s
    raw = {"name": "llama.cpp", "setting": "s", "generated": 10, "seconds": 2.0, "passes": 10, "bytes_read": 86_016}
    row = bench_report.summarize(raw, bandwidth_bps=1e9)
    assert row["floor_ratio"] is None and row["floor_s_per_token"] is None
    raw["bytes_read"] = 300_000_000  # 30 MB a token: 0.03 s of 0.2, 15% of its time
    assert bench_report.summarize(raw, bandwidth_bps=1e9)["floor_ratio"] == pytest.approx(0.2 / 0.03)


def _finished_run(out: Path, command: str, commands=None) -> None:
    """An e2e.json as an earlier run wrote it: int4 rows with no ratio or agreement filled in."""
    def row(name, tokens, seconds):
        raw = {"name": name, "setting": "s", "quantize": "int4", "generated": sum(map(len, tokens)),
               "seconds": seconds, "passes": 4, "bytes_read": 1000, "placement": {"streamed_layers": 0}}
        return dict(bench_report.summarize(raw, None), workload="humaneval", tokens=tokens, floor_ratio=9e4)
    rows = [row("target-only-int4", [[1, 2], [3, 4]], 4.0), row("llmcad-int4", [[1, 2, 5], [3, 6, 7]], 2.0)]
    (out / "e2e.json").write_text(json.dumps({
        "command": command, "commands": commands or [command], "machine": {}, "rows": rows, "chain_sweep": {},
        "workloads": {}, "bandwidth": {"floor_bps": {"s": 1e9}}, "git_commit": "abc"}))


def test_recompute_fills_a_finished_runs_derived_columns(tmp_path):
    _finished_run(tmp_path, "llmcad bench e2e --max-new-tokens 3 --max-new-tokens-baseline 2 --quantize int4")
    assert bench_e2e.main(["--recompute", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "e2e.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    # the baseline's 2 tokens a prompt are compared: prompt 1 differs at its second
    assert rows["llmcad-int4"]["agreement"] == 0.75 and rows["llmcad-int4"]["ratio_vs_target_only"] == 3.0
    assert rows["llmcad-int4"]["floor_ratio"] is None and report["recomputed"]["git_commit"]
    text = (tmp_path / "e2e.md").read_text()
    assert "Commit measured: abc" in text and "recomputed from the measured rows" in text
    assert "| llmcad-int4 | 3.00 | 3.00 |" in text and "| 0.750 |" in text


def test_recompute_names_a_recorded_command_it_cannot_read(tmp_path, capsys):
    _finished_run(tmp_path, "llmcad bench e2e (called from Python: x.py)")
    assert bench_e2e.main(["--recompute", "--out", str(tmp_path)]) == 2
    assert "is not an `llmcad bench e2e` command line" in capsys.readouterr().err
    _finished_run(tmp_path, "python -m llmcad.bench.e2e --max-new-tokens 3 --max-new-tokens-baseline 2")
    assert bench_e2e.main(["--recompute", "--out", str(tmp_path)]) == 0


def test_recompute_refuses_a_merged_report(tmp_path, capsys):
    _finished_run(tmp_path, "llmcad bench e2e", commands=["llmcad bench e2e", "llmcad bench e2e --append"])
    assert bench_e2e.main(["--recompute", "--out", str(tmp_path)]) == 2
    assert "merges 2 commands' rows" in capsys.readouterr().err


def test_rows_are_data():
    args = _parse(["--chain-k", "3", "--row-option", "llmcad-paper.prefetch=false", "--rows",
                   "target-only,chain,tree,llmcad-paper,llmcad"])
    rows = bench_e2e.select_rows(args, [3])
    assert [r.name for r in rows] == ["target-only", "chain", "tree", "llmcad-paper", "llmcad"]
    assert rows[1].options == {"mode": "chain", "chain_length": 3}
    assert rows[3].options == {"mode": "llmcad", "alpha_rule": "paper", "prefetch": False}


def test_quantized_rows_named_in_rows_are_exactly_the_rows_run():
    args = _parse(["--chain-k", "3,5", "--quantize", "int8,int4", "--rows",
                   "target-only,chain,llmcad,hf-assisted-offload,target-only-int8,target-only-int4,llmcad-int4,"
                   "chain-int8"])
    rows = bench_e2e.select_rows(args, [3, 5], ["int8", "int4"])
    assert [(r.name, r.options.get("chain_length")) for r in rows] == [
        ("target-only", None), ("chain", 3), ("chain", 5), ("llmcad", None), ("hf-assisted-offload", None),
        ("target-only-int8", None), ("chain-int8", 3), ("chain-int8", 5), ("target-only-int4", None),
        ("llmcad-int4", None)]
    assert [r.options.get("quantize") for r in rows[5:]] == ["int8"] * 3 + ["int4"] * 2
    assert bench_quant_rows.schemes_used(rows) == ["int8", "int4"]
    only_int4 = bench_e2e.select_rows(_parse(["--rows", "llmcad,llmcad-int4"]), [3], ["int8", "int4"])
    assert [r.name for r in only_int4] == ["llmcad", "llmcad-int4"]
    assert bench_quant_rows.schemes_used(only_int4) == ["int4"]  # int8 is not prepared


def test_quantize_without_quantized_names_copies_every_llmcad_row():
    rows = bench_e2e.select_rows(_parse(["--rows", "target-only,llmcad,hf-offload",
                                         "--row-option", "llmcad.prefetch=false",
                                         "--row-option", "llmcad-int4.alpha_rule=\"paper\""]), [3], ["int4"])
    assert [r.name for r in rows] == ["target-only", "llmcad", "hf-offload", "target-only-int4", "llmcad-int4"]
    assert rows[4].options == {"mode": "llmcad", "quantize": "int4", "prefetch": False, "alpha_rule": "paper"}
    assert [r.name for r in bench_e2e.select_rows(_parse([]), [3], ["int8"])] == \
        MAIN_NAMES + ["target-only-int8", "chain-int8", "tree-int8", "llmcad-paper-int8", "llmcad-int8"]


def _fake_row(plan, row, setting, work, index):
    """A row record whose speed depends on the chain length (k=3 fastest), one token a prompt."""
    seconds = {2: 3.0, 3: 1.0, 4: 2.0}.get(row.options.get("chain_length"), 1.0)
    n = len(plan["prompt_ids"])
    return {"name": row.name, "setting": setting[0], "options": row.options, "error": None, "generated": n,
            "seconds": seconds * n, "passes": n, "bytes_read": 0, "tokens": [[7]] * n}


def _fake_plan(tune):
    rows = [bench_e2e.Row("target-only", "engine", {"mode": "target-only"})] + [
        bench_e2e.Row("chain", "engine", {"mode": "chain", "chain_length": k}) for k in (2, 3, 4)] + [
        bench_e2e.Row("hf-offload", "hf", {}, cappable=False)]
    return {"rows": rows, "settings": [("native", None), ("cap300", 3e8)], "prompt_ids": [[1], [2], [3], [4]],
            "chain_tune_prompts": tune, "max_new_tokens": 4, "max_new_tokens_baseline": 4}


def test_chain_tuned_on_the_first_prompts_then_fastest_runs_all(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(bench_e2e, "spawn_row", lambda plan, row, setting, work, index: calls.append(
        (row.name, row.options.get("chain_length"), setting[0], len(plan["prompt_ids"]), index)) or
        _fake_row(plan, row, setting, work, index))
    plan = _fake_plan(tune=1)
    results = bench_e2e.run_jobs(plan, tmp_path)
    assert calls == [("target-only", None, "native", 4, 0), ("chain", 2, "native", 1, 1), ("chain", 3, "native", 1, 2),
                     ("chain", 4, "native", 1, 3), ("chain", 3, "native", 4, 4), ("hf-offload", None, "native", 4, 5),
                     ("target-only", None, "cap300", 4, 6), ("chain", 2, "cap300", 1, 7),
                     ("chain", 3, "cap300", 1, 8), ("chain", 4, "cap300", 1, 9), ("chain", 3, "cap300", 4, 10)]
    rows, sweep = bench_e2e.collect_rows(plan, results, {})
    assert [(r["name"], r["setting"], r["generated_tokens"]) for r in rows] == [
        ("target-only", "native", 4), ("chain", "native", 4), ("hf-offload", "native", 4),
        ("target-only", "cap300", 4), ("chain", "cap300", 4)]
    assert rows[1]["options"]["chain_length"] == 3 and rows[1]["tokens"] == [[7]] * 4
    assert sweep["native"] == [{"row": "chain", "chain_length": k, "tokens_per_s": 1 / s, "error": None, "prompts": 1}
                               for k, s in ((2, 3.0), (3, 1.0), (4, 2.0))]
    report = {"commands": ["c"], "machine": {}, "rows": rows, "chain_sweep": sweep, "workloads": {}}
    text = bench_report.markdown(report)
    assert "- chain k tuned on the first prompt (chain, native): k=2: 0.33 tok/s, k=3: 1.00 tok/s, k=4: 0.50 tok/s; " \
           "the fastest, k=3, then ran all 4 prompts as the chain row" in text


def test_chain_tuning_on_all_prompts_is_the_sweep_itself(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(bench_e2e, "spawn_row", lambda plan, row, setting, work, index: calls.append(
        len(plan["prompt_ids"])) or _fake_row(plan, row, setting, work, index))
    for tune in (None, 4, 9):
        calls.clear()
        plan = _fake_plan(tune)
        rows, sweep = bench_e2e.collect_rows(plan, bench_e2e.run_jobs(plan, tmp_path), {})
        assert calls == [4] * 9  # 5 rows natively, 4 capped: no tuning run, no rerun
        assert [s["prompts"] for s in sweep["cap300"]] == [4, 4, 4]
        assert rows[1]["options"]["chain_length"] == 3
        assert "- chain length sweep (chain, native): k=2: 0.33 tok/s" in bench_report.markdown(
            {"commands": ["c"], "machine": {}, "rows": rows, "chain_sweep": sweep, "workloads": {}})


def test_chain_tuning_with_every_length_failing_reports_the_chain_row_failed(monkeypatch, tmp_path):
    def failing(plan, row, setting, work, index):
        record = _fake_row(plan, row, setting, work, index)
        return dict(record, error="boom") if row.name == "chain" else record

    monkeypatch.setattr(bench_e2e, "spawn_row", failing)
    plan = dict(_fake_plan(tune=2), settings=[("native", None)])
    rows, _ = bench_e2e.collect_rows(plan, bench_e2e.run_jobs(plan, tmp_path), {})
    chain = next(r for r in rows if r["name"] == "chain")
    assert chain["error"] == "every chain length failed while tuning"


def test_chain_tuned_in_a_tiny_run(tiny_pair, tmp_path):
    draft, target = tiny_pair
    argv = ["bench", "e2e", "--tiny", "--draft", str(draft), "--target", str(target), "--out", str(tmp_path),
            "--rows", "target-only,chain", "--chain-k", "2,3", "--chain-tune-prompts", "1", "--max-new-tokens", "6",
            "--warmup-tokens", "2", "--in-process"]
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "e2e.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["target-only", "chain"]
    sweep = report["chain_sweep"]["native"]
    assert [(s["row"], s["chain_length"], s["prompts"]) for s in sweep] == [("chain", 2, 1), ("chain", 3, 1)]
    best = max(sweep, key=lambda s: s["tokens_per_s"])["chain_length"]
    assert rows["chain"]["options"]["chain_length"] == best
    assert rows["chain"]["tokens"] == rows["target-only"]["tokens"] and len(rows["chain"]["tokens"]) == len(PROMPTS)
    assert "chain k tuned on the first prompt (chain, native)" in (tmp_path / "e2e.md").read_text()


def test_agreement_with_a_shorter_baseline_counts_its_positions_only():
    rows = [{"name": "target-only", "setting": "s", "tokens_per_s": 1.0},
            {"name": "llmcad", "setting": "s", "tokens_per_s": 4.0}]
    tokens = {("target-only", "s"): [[1, 2]], ("llmcad", "s"): [[1, 2, 3, 4]]}
    bench_report.compare(rows, tokens, baseline_cut=True)
    assert rows[1]["agreement"] == 1.0 and rows[1]["ratio_vs_target_only"] == 4.0
    bench_report.compare(rows, tokens)
    assert rows[1]["agreement"] == 0.5


def test_humaneval_prompts_come_from_the_package():
    from llmcad.bench import workloads

    texts, labels = workloads.humaneval("3:5")
    assert labels == ["HumanEval/3", "HumanEval/4"]
    assert all(t.lstrip().startswith(("from", "def", "import")) for t in texts)


@pytest.mark.parametrize("argv, message", [
    (["--prompts", "5:2"], "START:END"),
    (["--chain-k", "0,4"], "positive integers"),
    (["--rows", "llmcad,bogus"], "unknown row(s) bogus"),
    (["--row-option", "nope"], "ROW.KEY=VALUE"),
    (["--rows", "llmcad,llmcad-int4", "--quantize", "int8"], "llmcad-int4 need --quantize int4"),
    (["--rows", "target-only-int8"], "need --quantize int8 (--quantize gives: nothing)"),
    (["--rows", "hf-offload-int8", "--quantize", "int8"], "unknown row(s) hf-offload-int8"),
    (["--quantize", "int3"], "unknown scheme(s) int3"),
    (["--chain-tune-prompts", "0"], "--chain-tune-prompts 0: expected at least 1 prompt"),
])
def test_bad_flags_fail_with_a_message(argv, message, tiny_pair, tmp_path, capsys):
    draft, target = tiny_pair
    rc = cli.main(["bench", "e2e", "--draft", str(draft), "--target", str(target), "--out", str(tmp_path), *argv])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_evictor_keeps_files_out_of_the_page_cache(tmp_path):
    if _on_tmpfs(tmp_path):
        pytest.skip("posix_fadvise cannot drop tmpfs pages")
    path = tmp_path / "weights.bin"
    with open(path, "wb") as f:
        f.write(os.urandom(4 << 20))
        os.fsync(f.fileno())  # dirty pages cannot be dropped; weights on disk are clean
    path.read_bytes()
    assert pagecache.cached_bytes([path]) == 4 << 20
    with pagecache.Evictor([tmp_path], check_s=0.0) as evictor:
        assert pagecache.cached_bytes([path]) == 0  # evicted on entry
        path.read_bytes()
        evictor.evict_now()  # what the forward pre-hook does
        assert pagecache.cached_bytes([path]) == 0
        assert evictor.max_cached_after_evict_bytes == 0
    with pagecache.Evictor([tmp_path], interval_s=0.002, check_s=0.01) as evictor:
        path.read_bytes()  # with a timer, a buffered read is dropped again within a few sweeps
        seen = evictor.ticks
        deadline = time.monotonic() + 30  # a few sweeps, however busy the machine
        while evictor.ticks <= seen + 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pagecache.cached_bytes([path]) == 0
    assert evictor.ticks > 5 and evictor.fincore_samples >= 1


def _parse(argv):
    import argparse

    parser = argparse.ArgumentParser()
    bench_e2e.add_arguments(parser)
    return parser.parse_args(argv)


def _on_tmpfs(path: Path) -> bool:
    best, fstype = "", ""
    with open("/proc/mounts", encoding="utf-8") as f:
        for line in f:
            mount, kind = line.split()[1], line.split()[2]
            if str(path.resolve()).startswith(mount) and len(mount) > len(best):
                best, fstype = mount, kind
    return fstype == "tmpfs"


def test_append_replaces_rows_of_the_same_setting_only():
    old = {"command": "a", "commands": ["a"], "rows": [{"name": "llmcad", "setting": "native", "v": 1},
                                                       {"name": "llmcad", "setting": "cap300", "v": 1}],
           "workloads": {"native": 1, "cap300": 1}, "chain_sweep": {}, "bandwidth": {"floor_bps": {"native": 1}}}
    new = {"command": "b", "commands": ["b"], "rows": [{"name": "llmcad", "setting": "cap300", "v": 2}],
           "workloads": {"cap300": 2}, "chain_sweep": {}, "bandwidth": {"floor_bps": {"cap300": 3}}}
    merged = bench_e2e.merge_reports(old, new)
    assert merged["commands"] == ["a", "b"]
    assert [(r["setting"], r["v"]) for r in merged["rows"]] == [("native", 1), ("cap300", 2)]
    assert merged["bandwidth"]["floor_bps"] == {"native": 1, "cap300": 3}


def test_append_replaces_the_sweep_of_the_same_row_and_setting_only():
    old = {"native": [{"chain_length": 4, "v": 1}, {"chain_length": 6, "v": 1}],
           "cap300": [{"row": "chain", "chain_length": 4, "v": 1}]}
    new = {"native": [{"row": "chain-int4", "chain_length": 4, "v": 2}],
           "cap300": [{"row": "chain", "chain_length": 6, "v": 2}]}
    merged = bench_e2e.merge_sweeps(old, new)
    assert [(s.get("row"), s["v"]) for s in merged["native"]] == [(None, 1), (None, 1), ("chain-int4", 2)]
    assert merged["cap300"] == new["cap300"]


def test_quantized_rows_run_on_prepared_targets(tiny_pair, tmp_path):
    draft, target = tiny_pair
    argv = ["bench", "e2e", "--tiny", "--draft", str(draft), "--target", str(target), "--out", str(tmp_path),
            "--rows", "llmcad-int4,target-only,llmcad,target-only-int8,llmcad-int8,target-only-int4",
            "--quantize", "int8,int4", "--max-new-tokens", "6", "--warmup-tokens", "2", "--in-process"]
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "e2e.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["target-only", "llmcad", "target-only-int8", "llmcad-int8", "target-only-int4",
                          "llmcad-int4"]
    assert [rows[n]["quantize"] for n in rows] == [None, None, "int8", "int8", "int4", "int4"]
    assert all(r["error"] is None for r in rows.values())
    for scheme in ("int8", "int4"):
        # each quantized llmcad row is lossless against its own quantized target-only row
        assert rows[f"llmcad-{scheme}"]["tokens"] == rows[f"target-only-{scheme}"]["tokens"]
        assert rows[f"llmcad-{scheme}"]["bytes_read"] / rows[f"llmcad-{scheme}"]["target_passes"] < \
            rows["llmcad"]["bytes_read"] / rows["llmcad"]["target_passes"] / 2
    assert (tmp_path / "quantized-target-int4" / "config.json").is_file()


# ---------------------------------------------------------------- a run keeps what it measured
def _tiny_argv(tiny_pair, out, *extra):
    draft, target = tiny_pair
    return ["bench", "e2e", "--tiny", "--draft", str(draft), "--target", str(target), "--out", str(out),
            "--max-new-tokens", "4", "--warmup-tokens", "1", *extra]


def _counting_rows(monkeypatch, calls, fail_at=None):
    def fake(plan, row, setting, work, index):
        calls.append((row.name, plan["max_new_tokens"]))
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt  # the run dies mid-way
        return _fake_row(plan, row, setting, work, index)

    monkeypatch.setattr(bench_e2e, "spawn_row", fake)


def test_a_missing_dependency_stops_the_run_before_any_row(tiny_pair, tmp_path, monkeypatch, capsys):
    import sys

    calls = []
    _counting_rows(monkeypatch, calls)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed
    rc = cli.main(_tiny_argv(tiny_pair, tmp_path, "--rows", "target-only,hf-offload"))
    err = capsys.readouterr().err
    assert rc == 2 and calls == []
    assert "matplotlib (pip install 'llmcad[bench]')" in err and "nothing was run" in err


def test_missing_llama_cpp_is_named_with_the_others(monkeypatch):
    from llmcad.bench import deps

    monkeypatch.setattr(deps, "_absent", lambda module: module in ("matplotlib", "accelerate"))
    missing = [m for m, _ in deps.missing(humaneval=False, hf_rows=True, llama_python="/nonexistent/python")]
    assert missing == ["matplotlib", "accelerate", "llama_cpp"]
    with pytest.raises(ImportError, match="matplotlib .*; accelerate .*; llama_cpp \\(in /nonexistent/python"):
        deps.check(humaneval=False, hf_rows=True, llama_python="/nonexistent/python")


def test_a_failing_chart_costs_no_data(tiny_pair, tmp_path, monkeypatch, capsys):
    from llmcad.bench import plots

    _counting_rows(monkeypatch, [])

    def broken(*args, **kwargs):
        raise RuntimeError("no display")

    monkeypatch.setattr(plots, "plot_rows", broken)
    assert cli.main(_tiny_argv(tiny_pair, tmp_path, "--rows", "target-only,llmcad")) == 0
    assert "warning: charts not drawn (RuntimeError: no display)" in capsys.readouterr().err
    report = json.loads((tmp_path / "e2e.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["target-only", "llmcad"] and report["plots"] == []
    assert "| llmcad |" in (tmp_path / "e2e.md").read_text()


def test_rows_are_on_disk_as_they_finish_and_a_rerun_resumes(tiny_pair, tmp_path, monkeypatch):
    calls = []
    _counting_rows(monkeypatch, calls, fail_at=3)
    argv = _tiny_argv(tiny_pair, tmp_path, "--rows", "target-only,tree,llmcad")
    assert cli.main(argv) == 130  # interrupted at the third row
    assert not (tmp_path / "e2e.json").exists()
    lines = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [line["record"]["name"] for line in lines] == ["target-only", "tree"]  # written before the kill
    assert lines[0]["record"]["command"].startswith("llmcad bench e2e") and "git_commit" in lines[0]["record"]
    calls.clear()
    _counting_rows(monkeypatch, calls)
    assert cli.main(argv) == 0
    assert calls == [("llmcad", 4)]  # the finished rows are kept
    report = json.loads((tmp_path / "e2e.json").read_text())
    assert [(r["name"], bool(r.get("resumed"))) for r in report["rows"]] == [
        ("target-only", True), ("tree", True), ("llmcad", False)]
    calls.clear()
    assert cli.main(argv[:-4] + ["--max-new-tokens", "5", "--rows", "target-only,tree,llmcad"]) == 0
    assert calls == [("target-only", 5), ("tree", 5), ("llmcad", 5)]  # another configuration: nothing reused


def test_a_line_cut_short_and_failed_rows_are_not_reused(tmp_path):
    from llmcad.bench.rowlog import RowLog

    log = RowLog(tmp_path)
    log.append("a", {"name": "x", "error": None})
    log.append("b", {"name": "y", "error": "boom"})
    with open(tmp_path / "rows.jsonl", "a") as f:
        f.write('{"key": "c", "rec')
    again = RowLog(tmp_path)
    assert again.finished("a") == {"name": "x", "error": None}
    assert again.finished("b") is None and again.finished("c") is None


def test_results_go_to_a_fresh_folder_by_default(tiny_pair, tmp_path, monkeypatch):
    _counting_rows(monkeypatch, [])
    monkeypatch.chdir(tmp_path)
    draft, target = tiny_pair
    assert cli.main(["bench", "e2e", "--tiny", "--draft", str(draft), "--target", str(target), "--rows",
                     "target-only"]) == 0
    made = sorted(tmp_path.glob("llmcad-bench-*"))
    assert len(made) == 1 and (made[0] / "e2e.json").is_file() and (made[0] / "rows.jsonl").is_file()
    assert not (tmp_path / "benchmarks").exists()


# ---------------------------------------------------------------- rates, profiles, limits
@pytest.mark.parametrize("text, rate", [("300MB/s", 300e6), ("1.4GB/s", 1.4e9), ("300MiB/s", 300 * 2**20),
                                        ("300e6", 300e6), ("2000000", 2e6), ("5 MB / s", 5e6), ("4e6", 4e6)])
def test_one_rate_syntax(text, rate):
    from llmcad.streaming.budget import parse_rate

    assert parse_rate(text) == pytest.approx(rate)


@pytest.mark.parametrize("text", ["fast", "1e-9", "0", "-5MB/s", "300MB/h", "inf"])
def test_bad_rates_are_refused(text):
    from llmcad.errors import BudgetError
    from llmcad.streaming.budget import parse_rate

    with pytest.raises(BudgetError, match="rate|at least 1 byte/s"):
        parse_rate(text, what="--cap")


def test_generate_takes_the_same_rate_syntax(tiny_pair, capsys):
    draft, target = tiny_pair
    argv = ["generate", "--draft", str(draft), "--target", str(target), "--prompt", "def add(a, b):\n",
            "--max-new-tokens", "2", "--memory-budget", str(bench_e2e.tiny_budget(draft, target)), "--quiet"]
    assert cli.main(argv + ["--bandwidth-cap", "300MB/s"]) == 0
    capsys.readouterr()
    assert cli.main(argv + ["--bandwidth-cap", "fast"]) == 2
    assert "--bandwidth-cap='fast': expected a rate such as '300MB/s'" in capsys.readouterr().err


def test_profiles_are_kernel_settings_or_say_they_are_emulated(monkeypatch, capsys):
    from llmcad.bench import profiles

    monkeypatch.setattr(profiles, "cgroups_unavailable", lambda: None)
    settings = profiles.with_budget(profiles.make_settings(_parse(["--profile", "orin-nvme,emmc"])), "2.5GiB")
    assert [(s.name, s.read_limit, s.memory_limit, s.kernel, s.cap) for s in settings] == [
        ("orin-nvme", 1.4e9, int(2.5 * 2**30), True, None), ("emmc", 300e6, int(2.5 * 2**30), True, None)]
    two = profiles.make_settings(_parse(["--profile", "emmc", "--memory-limit", "1GiB,3GiB", "--read-limit",
                                         "100MiB/s"]))
    assert [(s.name, s.memory_limit) for s in two] == [("emmc@1.00GiB", 2**30), ("emmc@3.00GiB", 3 * 2**30),
                                                       ("read104.858MB@1.00GiB", 2**30),
                                                       ("read104.858MB@3.00GiB", 3 * 2**30)]
    both = profiles.with_budget(profiles.make_settings(_parse(["--profile", "emmc", "--memory-limit", "4GiB"])),
                                "2.5GiB", explicit=True)  # --memory-budget and --memory-limit both given
    assert [(s.memory_limit, profiles.budget_of(s, "2.5GiB")) for s in both] == [(4 * 2**30, str(int(2.5 * 2**30)))]
    assert profiles.budget_of(settings[0], "1GiB") == str(int(2.5 * 2**30))  # the limit is the budget
    monkeypatch.setattr(profiles, "cgroups_unavailable", lambda: "not root: creating cgroups needs root")
    capsys.readouterr()
    emulated = profiles.make_settings(_parse(["--profile", "emmc"]))
    assert "cgroups cannot be written here (not root" in capsys.readouterr().err
    assert [(s.name, s.cap, s.kernel, s.enforced_by) for s in emulated] == [
        ("emmc-emulated", 300e6, False, "emulated by llmcad")]
    plan = {"rows": [bench_e2e.Row("llmcad", "engine", {"mode": "llmcad"}),
                     bench_e2e.Row("hf-offload", "hf", {}, cappable=False)], "settings": emulated + settings}
    assert [(s.name, [r.name for r in g]) for s, g in bench_e2e.row_groups(plan)] == [
        ("emmc-emulated", ["llmcad"]), ("orin-nvme", ["llmcad"]), ("orin-nvme", ["hf-offload"]),
        ("emmc", ["llmcad"]), ("emmc", ["hf-offload"])]  # the kernel limits every row, peers included


@pytest.mark.parametrize("argv, message", [
    (["--profile", "sdcard"], "unknown profile(s) sdcard"),
    (["--memory-limit", "1GiB"], "--memory-limit needs --profile or --read-limit"),
    (["--profile", "emmc", "--read-limit", "slow"], "--read-limit='slow': expected a rate"),
    (["--rows", "target-only,llama.cpp"], "llama.cpp need --llama-python"),
    (["--rows", "llama.cpp-draft", "--llama-python", "python3"], "llama.cpp-draft needs --llama-speculative"),
    (["--rows", "llama.cpp-draft", "--llama-python", "python3", "--llama-speculative", "/nonexistent/spec"],
     "--llama-speculative /nonexistent/spec: not an executable file"),
    (["--mt-bench", "81,130"], "ids 121-160 are held out"),
    (["--mt-bench", "12"], "expected question ids in 81-160"),
])
def test_bad_profile_and_workload_flags(argv, message, tiny_pair, tmp_path, capsys):
    assert cli.main(_tiny_argv(tiny_pair, tmp_path, *argv)) == 2
    assert message in capsys.readouterr().err


def _cgroups_reason():
    from llmcad.bench import profiles

    return profiles.cgroups_unavailable()


needs_cgroups = pytest.mark.skipif(_cgroups_reason() is not None, reason=f"cgroups: {_cgroups_reason()}")


@needs_cgroups
def test_profile_rows_run_under_kernel_limits_read_back(tiny_pair, tmp_path):
    argv = _tiny_argv(tiny_pair, tmp_path, "--profile", "emmc", "--memory-limit", "3GiB", "--rows",
                      "target-only,hf-offload")
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "e2e.json").read_text())
    assert [(r["name"], r["setting"], r["error"]) for r in report["rows"]] == [
        ("target-only", "emmc", None), ("hf-offload", "emmc", None)]
    for row in report["rows"]:
        assert row["enforced_by"] == "kernel (cgroup)" and row["evictor"] is None
        assert row["kernel_limits"]["memory_bytes"] == 3 * 2**30 and row["kernel_limits"]["read_bps"] == 300_000_000
        assert row["options"] and row["memory_limit"] == 3 * 2**30
        assert row["peak_rss_bytes"] > 0 and 0 < row["cgroup_peak_bytes"] <= 3 * 2**30
    assert report["rows"][0]["placement"]["budget_bytes"] == 3 * 2**30  # the limit is the row's budget
    assert report["rows"][1]["agreement"] == 1.0
    assert "cgroup charges it" in report["workloads"]["emmc"]["page_cache"]
    assert "enforced by the kernel (cgroup)" in (tmp_path / "e2e.md").read_text()


@needs_cgroups
def test_a_row_the_oom_killer_ends_is_reported_as_such(tiny_pair, tmp_path, capsys):
    argv = _tiny_argv(tiny_pair, tmp_path, "--profile", "emmc", "--memory-limit", "48MiB", "--rows", "target-only")
    assert cli.main(argv) == 0  # the row's result, not a failure of the benchmark
    row = json.loads((tmp_path / "e2e.json").read_text())["rows"][0]
    assert row["oom_killed"] is True and row["tokens_per_s"] is None
    assert row["error"].startswith("killed by the OOM killer at the memory limit 48.0 MiB")
    assert isinstance(row["stderr_tail"], list)  # the row's last words, to tell loading from generating
    assert "| target-only | OOM-killed |" in (tmp_path / "e2e.md").read_text()


# ---------------------------------------------------------------- MT-Bench and Spec-Bench output
@pytest.fixture(scope="module")
def chat_pair(tmp_path_factory):
    """The tiny pair with a ChatML template (MT-Bench prompts go through the target's template)."""
    from transformers import AutoTokenizer

    draft, target = build_tiny_pair(tmp_path_factory.mktemp("tiny_chat"))
    for path in (draft, target):
        tok = AutoTokenizer.from_pretrained(path)
        tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                             "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
        tok.save_pretrained(path)
    return draft, target


def test_mt_bench_ids_and_held_out_set():
    from llmcad.bench import workloads

    assert workloads.parse_ids("81-83,90", held_out=False) == [81, 82, 83, 90]
    assert workloads.parse_ids("120-122", held_out=True) == [120, 121, 122]
    questions = [json.loads(line) for line in workloads.MT_BENCH_FILE.read_text().splitlines()]
    assert [q["question_id"] for q in questions] == list(range(81, 161))


def test_mt_bench_answers_in_spec_bench_layout(chat_pair, tmp_path):
    from transformers import AutoTokenizer

    questions = tmp_path / "question.jsonl"  # MT-Bench's layout, questions short enough for a 128-position model
    questions.write_text("".join(json.dumps({"question_id": i, "category": c, "turns": [t, "and again"]}) + "\n"
                                 for i, c, t in ((81, "writing", "def add(a, b):"), (82, "coding", "for i in"),
                                                 (83, "math", "print("))))
    argv = _tiny_argv(chat_pair, tmp_path, "--prompts", "none", "--mt-bench", "81,82", "--rows",
                      "target-only,llmcad,hf-assisted-offload", "--in-process", "--mt-bench-file", str(questions))
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "e2e.json").read_text())
    assert {r["workload"] for r in report["rows"]} == {"mt-bench"}
    assert report["prompt_labels"] == {"mt-bench": ["mt_bench/81", "mt_bench/82"]}
    tok = AutoTokenizer.from_pretrained(chat_pair[1])
    assert all(r["agreement"] == 1.0 for r in report["rows"])
    for name in ("target-only", "llmcad", "hf-assisted-offload"):
        lines = [json.loads(x) for x in (tmp_path / "specbench" / "mt-bench" / "native" / f"{name}.jsonl")
                 .read_text().splitlines()]
        row = next(r for r in report["rows"] if r["name"] == name)
        assert [x["question_id"] for x in lines] == [81, 82] and [x["category"] for x in lines] == ["writing", "coding"]
        for x, tokens in zip(lines, row["tokens"]):
            choice = x["choices"][0]
            assert set(choice) >= {"turns", "new_tokens", "wall_time", "accept_lengths"}
            assert choice["new_tokens"] == [len(tokens)] and choice["wall_time"][0] > 0
            assert sum(choice["accept_lengths"]) == len(tokens)  # every emitted token, pass by pass
            assert choice["turns"] == [tok.decode(tokens, skip_special_tokens=True)]
            if name == "target-only":
                assert set(choice["accept_lengths"]) == {1}



def test_mt_bench_prompt_is_the_first_turn_in_the_chat_template(chat_pair, tmp_path):
    from llmcad.bench import workloads
    from llmcad.models.loading import load_tokenizer

    questions = tmp_path / "question.jsonl"
    questions.write_text(json.dumps({"question_id": 81, "category": "writing", "turns": ["hi there", "again"]}) + "\n")
    tok = load_tokenizer(chat_pair[1])
    wl = workloads.mt_bench(tok, [81], questions, "81")
    assert tok.decode(wl["prompt_ids"][0]) == "<s>user\nhi there</s>\n<s>assistant\n"
    assert wl["labels"] == ["mt_bench/81"] and wl["categories"] == ["writing"]
    assert tok.decode(wl["warmup_ids"]) == f"<s>user\n{workloads.WARMUP_QUESTION}</s>\n<s>assistant\n"


def test_a_row_warms_up_on_a_prompt_outside_the_set(monkeypatch):
    """A warm-up on a measured prompt would leave its prefix cached for the rows that keep a cache."""
    from llmcad.bench import rows

    class Runner:
        bytes_source, calls = "fake", []

        def generate(self, ids, max_new_tokens):
            self.calls.append(list(ids))
            return [5] * max_new_tokens, {"generated": max_new_tokens, "seconds": 1.0, "passes": 1}

        def reset(self):
            pass

        def placement(self):
            return {}

    job = {"prompt_ids": [[1, 2, 3], [1, 2, 4]], "warmup_ids": [9, 8], "warmup_tokens": 1, "max_new_tokens": 2,
           "page_cache": "kernel"}
    record = rows._timed_prompts(Runner(), job)
    assert Runner.calls == [[9, 8], [1, 2, 3], [1, 2, 4]] and record["tokens"] == [[5, 5], [5, 5]]


# ---------------------------------------------------------------- llama.cpp rows (llama_cpp stood in for)
FAKE_LLAMA = '''
__version__ = "fake"


class Llama:
    """Emits last + 1 (mod 50) greedily: one token a pass, three with a draft (prompt lookup)."""

    def __init__(self, model_path, draft_model=None, **options):
        self.draft_model, self.options = draft_model, options

    def eval(self, tokens):
        pass

    def detokenize(self, tokens, special=False):  # token t is the text "<t>"
        return "".join(f"<{t}>" for t in tokens).encode()

    def tokenize(self, text, add_bos=True, special=False):
        import re

        return [int(t) for t in re.findall(rb"<(\\d+)>", text)]

    def generate(self, tokens, **sampling):
        assert sampling["temp"] == 0.0 and sampling["top_k"] == 1
        seq = list(tokens)
        while True:
            self.eval(seq)
            for _ in range(3 if self.draft_model is not None else 1):
                seq.append((seq[-1] + 1) % 50)
                yield seq[-1]
'''
FAKE_LOOKUP = '''
class LlamaPromptLookupDecoding:
    def __init__(self, max_ngram_size=2, num_pred_tokens=10):
        self.num_pred_tokens = num_pred_tokens
'''


FAKE_SPECULATIVE = '''
"""Stands in for llama-speculative-simple: emits last + 1 (mod 50), 4 tokens a pass (3 drafted, all accepted),
asked -n N, generates N + 1, and prints what the real example prints where the row reads it."""
import re
import sys

args = sys.argv[1:]
option = lambda name: args[args.index(name) + 1]
assert option("--spec-type") == "draft-simple" and option("--temp") == "0" and option("-lv") == "5"
if option("-p") == "<13>":
    print("llama_model_load: error loading model", file=sys.stderr)
    sys.exit(3)
prompt = option("-p")
seq = [int(t) for t in re.findall(r"<(\\d+)>", prompt)]
n = int(option("-n")) + 1
out = []
while len(out) < n:
    step = min(4, n - len(out))
    for _ in range(step):
        out.append(((out or seq)[-1] + 1) % 50)
    print(f"0.00.100.000 D accepted {step - 1}/{step - 1} draft tokens, the last target token is: ({out[-1]})",
          file=sys.stderr)
sys.stdout.write("\\n\\n" + prompt + "".join(f"<{t}>" for t in out) + "\\n\\n" + "\\n\\n")
print(f"0.00.200.000 I encoded {len(seq):4d} tokens in    0.250 seconds, speed:   12.000 t/s", file=sys.stderr)
print(f"0.00.200.001 I decoded {n:4d} tokens in    0.500 seconds, speed:    8.000 t/s", file=sys.stderr)
'''


@pytest.fixture
def fake_speculative(tmp_path):
    import sys

    binary = tmp_path / "llama-speculative-simple"
    binary.write_text(f"#!{sys.executable}\n" + FAKE_SPECULATIVE)
    binary.chmod(0o755)
    return binary


@pytest.fixture
def fake_llama_cpp(tmp_path, monkeypatch):
    """A stand-in llama_cpp package on PYTHONPATH (the real one is built into its own venv, never CI's)."""
    root = tmp_path / "fake-llama"
    (root / "llama_cpp").mkdir(parents=True)
    (root / "llama_cpp" / "__init__.py").write_text(FAKE_LLAMA)
    (root / "llama_cpp" / "llama_speculative.py").write_text(FAKE_LOOKUP)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    gguf = tmp_path / "target.gguf"
    gguf.write_bytes(b"GGUF")
    return gguf


def test_llama_rows_count_passes_and_accepted_tokens(tiny_pair, tmp_path, fake_llama_cpp):
    import sys

    out = tmp_path / "out"
    argv = _tiny_argv(tiny_pair, out, "--rows", "target-only,llama.cpp,llama.cpp-lookup", "--llama-python",
                      sys.executable, "--gguf", str(fake_llama_cpp))
    assert cli.main(argv) == 0
    rows = {r["name"]: r for r in json.loads((out / "e2e.json").read_text())["rows"]}
    assert rows["llama.cpp"]["error"] is None and rows["llama.cpp-lookup"]["error"] is None
    assert rows["llama.cpp"]["tokens_per_pass"] == 1.0 and rows["llama.cpp"]["target_passes"] == 8
    assert rows["llama.cpp-lookup"]["target_passes"] == 4  # 3 + 1 tokens a prompt, 4 tokens asked
    assert rows["llama.cpp"]["tokens"] == rows["llama.cpp-lookup"]["tokens"]
    assert rows["llama.cpp"]["placement"] == {"gguf": str(fake_llama_cpp), "mmap": True, "llama_cpp": "fake"}
    assert rows["llama.cpp"]["peak_rss_bytes"] > 0
    spec = [json.loads(x) for x in (out / "specbench" / "tiny" / "native" / "llama.cpp-lookup.jsonl")
            .read_text().splitlines()]
    assert [x["choices"][0]["accept_lengths"] for x in spec] == [[3, 1], [3, 1]]


def test_the_draft_model_row_runs_llamas_speculative_example(tiny_pair, tmp_path, fake_llama_cpp,
                                                          fake_speculative):
    import sys

    out = tmp_path / "out"
    argv = _tiny_argv(tiny_pair, out, "--rows", "llama.cpp,llama.cpp-draft", "--llama-python", sys.executable,
                      "--gguf", str(fake_llama_cpp), "--llama-speculative", str(fake_speculative),
                      "--gguf-draft", str(fake_llama_cpp))
    assert cli.main(argv) == 0
    rows = {r["name"]: r for r in json.loads((out / "e2e.json").read_text())["rows"]}
    drafted = rows["llama.cpp-draft"]
    assert drafted["error"] is None
    assert drafted["tokens"] == rows["llama.cpp"]["tokens"]  # the prompt's ids went through as text
    assert drafted["target_passes"] == 2 and drafted["tokens_per_pass"] == 4.0  # -n 3: 4 tokens in one pass
    assert drafted["seconds"] == pytest.approx(1.5) and drafted["first_pass_s"] == pytest.approx(0.5)
    assert drafted["placement"]["gguf_draft"] == str(fake_llama_cpp)
    spec = [json.loads(x) for x in (out / "specbench" / "tiny" / "native" / "llama.cpp-draft.jsonl")
            .read_text().splitlines()]
    assert [x["choices"][0]["accept_lengths"] for x in spec] == [[4], [4]]


def test_a_failed_speculative_example_fails_its_row_by_name(tiny_pair, tmp_path, fake_llama_cpp, fake_speculative,
                                                            monkeypatch):
    import sys

    from llmcad.bench import llama_row

    job = {"row": {"name": "llama.cpp-draft", "options": {"draft": "model"}}, "setting": "native",
           "gguf": str(fake_llama_cpp), "gguf_draft": str(fake_llama_cpp), "llama_speculative": str(fake_speculative),
           "prompt_ids": [[13]], "warmup_ids": [13], "max_new_tokens": 4, "warmup_tokens": 1, "seed": 0, "threads": 1, "eos_ids": []}
    monkeypatch.syspath_prepend(str(fake_llama_cpp.parent / "fake-llama"))
    monkeypatch.delitem(sys.modules, "llama_cpp", raising=False)
    record = llama_row.row_record(job)
    assert "llama-speculative-simple exited with status 3" in record["error"]
    assert "error loading model" in record["error"]
    record = llama_row.row_record({**job, "llama_speculative": str(tmp_path / "absent")})
    assert record["error"].startswith("FileNotFoundError: llama_speculative: no such file")


def test_llama_rows_are_not_capped_by_the_streamer(tiny_pair, tmp_path):
    plan = {"rows": bench_e2e.LLAMA_ROWS, "settings": [("cap300", 3e8)]}
    assert bench_e2e.row_groups(plan) == []


def test_the_hf_peer_measures_the_runtime_floor_before_its_draft_loads(tiny_pair_dirs, tmp_path, monkeypatch):
    """The peer's budget counts the runtime as the engine does: measured before any weight loads (after
    the draft, the floor would count the draft twice and leave the target nothing)."""
    from llmcad import memory
    from llmcad.bench import peers

    monkeypatch.setattr(memory, "_FLOOR", [])
    floors_at_draft_load, load = [], peers.load_causal_lm

    def spy(*args, **kwargs):
        floors_at_draft_load.append(list(memory._FLOOR))
        return load(*args, **kwargs)

    monkeypatch.setattr(peers, "load_causal_lm", spy)
    dirs = tiny_pair_dirs("llama")
    peers.HFOffloadPeer(dirs["target"], memory_budget="4GiB", offload_folder=tmp_path / "offload", draft=dirs["same"])
    assert len(floors_at_draft_load) == 1 and floors_at_draft_load[0]  # measured already when the draft loaded


def test_the_hf_peer_refuses_a_budget_that_leaves_its_target_nothing_to_hold(tiny_pair_dirs, tmp_path):
    """A budget that leaves the target a few bytes: accelerate would offload the whole model to disk and
    fail inside generate; the peer says so when it loads, naming the figures."""
    from llmcad.bench import peers
    from llmcad.errors import BudgetError

    dirs = tiny_pair_dirs("llama")
    roomy = peers.HFOffloadPeer(dirs["target"], memory_budget="4GiB", offload_folder=tmp_path / "a", draft=dirs["same"])
    others = roomy.budget_bytes - roomy.target_budget_bytes  # runtime, draft and KV caches
    with pytest.raises(BudgetError, match="leaves 1000 bytes for the target.*offloads the whole model"):
        peers.HFOffloadPeer(dirs["target"], memory_budget=others + 1000, offload_folder=tmp_path / "b", draft=dirs["same"])
