"""The one table of scripts/device_check.sh: each GPU claim, whether its checks passed, its figures.

    python scripts/device_table.py OUT_DIR STAGE|STATUS|SECONDS...

Reads OUT_DIR/pytest.xml (JUnit), OUT_DIR/report.jsonl (figures written by tests/test_gpu.py) and
OUT_DIR/device_bench.json (benchmarks/device_bench.py); prints a Markdown table.
"""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# claim -> (test file, name prefixes; empty: every test of the file not claimed elsewhere)
CLAIMS = {
    "kernels": ("test_tree_cuda", ()),
    "lossless-greedy": ("test_gpu", ("test_greedy_on_gpu", "test_streamed_target_on_gpu_is_lossless",
                                     "test_streamed_logits_match_resident_on_gpu")),
    "lossless-sampled": ("test_gpu", ("test_sampled_",)),
    "provisional": ("test_gpu", ("test_provisional_drafting",)),
    "fp16-bitwise": ("test_gpu", ("test_fp16_streamed",)),
    "release-order": ("test_gpu", ("test_release_ordering",)),
    "gpu-other": ("test_gpu", ()),
    "transfers": ("test_gpu_transfers", ()),
    "stub-streams": ("test_gpu_upload", ()),
}
BENCH_FIGURES = {
    "h2d": ("one_memcpy_gbps", "ring_gbps", "ring_vs_one_memcpy"),
    "timeline": ("compute_overlapped", "upload_overlapped", "upload_ms", "compute_ms"),
    "tree_plan": ("nodes", "gpu_us", "cpu_us", "gpu_speedup"),
    "streamed_pass": ("gpu_path", "wall_s", "io_s", "compute_s", "overlap_ratio"),
    "e2e": ("pair", "llmcad_vs_target_only", "lossless"),
}


def claim_of(case) -> str | None:
    module = case.get("classname", "").rsplit(".", 1)[-1]
    name = case.get("name", "")
    for claim, (file, prefixes) in CLAIMS.items():
        if module == file and prefixes and name.startswith(prefixes):
            return claim
    for claim, (file, prefixes) in CLAIMS.items():
        if module == file and not prefixes:
            return claim
    return None


def test_rows(out: Path) -> dict:
    results = {claim: {"passed": 0, "failed": 0, "skipped": 0, "failures": []} for claim in CLAIMS}
    try:
        root = ET.parse(out / "pytest.xml").getroot()
    except (OSError, ET.ParseError):
        return {}
    for case in root.iter("testcase"):
        claim = claim_of(case)
        if claim is None:
            continue
        if case.find("failure") is not None or case.find("error") is not None:
            results[claim]["failed"] += 1
            results[claim]["failures"].append(case.get("name"))
        elif case.find("skipped") is not None:
            results[claim]["skipped"] += 1
        else:
            results[claim]["passed"] += 1
    return results


def figures_from_report(out: Path) -> dict:
    figures: dict = {}
    try:
        lines = (out / "report.jsonl").read_text().splitlines()
    except OSError:
        return figures
    for line in lines:
        row = json.loads(line)
        check = row.pop("check")
        claim = next((c for c in CLAIMS if check.startswith(c)), check)
        figures.setdefault(claim, []).append(f"{check}: " + ", ".join(f"{k}={fmt(v)}" for k, v in row.items()))
    return figures


def fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def bench_rows(out: Path) -> list:
    try:
        rows = json.loads((out / "device_bench.json").read_text())
    except (OSError, ValueError):
        return []
    table = []
    for row in rows:
        name = row["bench"]
        if "error" in row:
            table.append((name, "failed", row["error"][:120]))
            continue
        keys = BENCH_FIGURES.get(name, tuple(k for k in row if k != "bench"))
        table.append((name, "measured", ", ".join(f"{k}={fmt(row[k])}" for k in keys if k in row)))
    return table


def main(argv) -> int:
    out = Path(argv[1])
    print("\n| check | result | figures |\n| --- | --- | --- |")
    for stage in argv[2:]:
        name, status, seconds = stage.split("|")
        print(f"| stage {name} | {status} | {seconds} s |")
    figures = figures_from_report(out)
    for claim, r in test_rows(out).items():
        total = r["passed"] + r["failed"] + r["skipped"]
        result = "no tests ran" if total == 0 else ("FAILED " + ", ".join(r["failures"])[:160] if r["failed"]
                                                     else ("passed" if r["passed"] else "skipped"))
        counts = f"{r['passed']} passed, {r['failed']} failed, {r['skipped']} skipped"
        print(f"| {claim} | {result} | {counts}; {'; '.join(figures.get(claim, []))} |")
    for name, result, text in bench_rows(out):
        print(f"| {name} | {result} | {text} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
