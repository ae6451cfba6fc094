"""Smoke runs of the benchmark scripts as real subprocesses: they start, finish and write what they promise."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_projector_smoke(tmp_path):
    out = tmp_path / "x.json"
    process = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_projector.py"), "--smoke", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert process.returncode == 0, process.stderr
    result = json.loads(out.read_text())
    for field in ("machine", "torch", "transformers", "device", "threads", "dtypes", "flops_per_image",
                  "matmul_gflops", "results", "max_abs_diff"):
        assert field in result, field
    assert {(row["batch"], row["dtype"]) for row in result["results"]} == {
        (batch, dtype) for batch in (1, 8) for dtype in ("fp32", "bf16")
    }
    for row in result["results"]:
        for name in ("ours", "original"):
            assert row[f"{name}_ms"] > 0 and row[f"{name}_images_per_s"] > 0 and row[f"{name}_gflops"] > 0
    assert result["max_abs_diff"] <= 1e-5
    assert "| batch | dtype |" in process.stdout
