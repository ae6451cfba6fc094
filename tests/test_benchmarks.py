"""Smoke runs of every benchmark script as a real subprocess: they start, finish and write what they promise."""

import importlib.util
import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    process = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), "--smoke", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    return process


def test_bench_projector_smoke(tmp_path):
    out = tmp_path / "x.json"
    process = run_script("bench_projector.py", "--out", str(out))
    result = json.loads(out.read_text())
    for field in (
        "machine",
        "torch",
        "transformers",
        "device",
        "threads",
        "dtypes",
        "flops_per_image",
        "matmul_gflops",
        "results",
        "max_abs_diff",
    ):
        assert field in result, field
    assert {(row["batch"], row["dtype"]) for row in result["results"]} == {
        (batch, dtype) for batch in (1, 8) for dtype in ("fp32", "bf16")
    }
    for row in result["results"]:
        for name in ("ours", "original"):
            assert row[f"{name}_ms"] > 0 and row[f"{name}_images_per_s"] > 0 and row[f"{name}_gflops"] > 0
    assert result["max_abs_diff"] <= 1e-5
    assert "| batch | dtype |" in process.stdout


def load_bench_e2e():
    spec = importlib.util.spec_from_file_location("bench_e2e", BENCHMARKS / "bench_e2e.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_e2e_smoke(tmp_path):
    out, plot = tmp_path / "e2e.json", tmp_path / "e2e.png"
    process = run_script("bench_e2e.py", "--out", str(out), "--plot", str(plot))
    results = json.loads(out.read_text())
    assert plot.stat().st_size > 0
    # The tables are rendered from the JSON alone, so docs can be regenerated with --from-json.
    assert load_bench_e2e().markdown(results) in process.stdout

    assert {"torch", "transformers", "threads", "dtype", "device_name", "cpu_affinity"} <= results["env"].keys()
    # The staged timing pipeline gives the same first token as each model's own forward, at 336 px and HD.
    assert all(results["pipeline_matches_forward"].values())
    assert all(row["pipeline_matches_forward"] for rows in results["hd"].values() for row in rows.values())

    grid = results["shapes"]["vision"]["image_size"] // results["shapes"]["vision"]["patch_size"]
    text = results["shapes"]["text"]
    assert list(results["base"]) == ["1", "2"]
    for batch, rows in results["base"].items():
        baseline = rows["llava-1.5-mlp"]
        assert baseline["image_tokens"] == grid * grid
        # Measured KV bytes per image = layers · (k, v) · kv heads · head dim · 4 bytes (fp32) · image tokens.
        head_dim = text["hidden_size"] // text["num_attention_heads"]
        per_token = text["num_hidden_layers"] * 2 * text["num_key_value_heads"] * head_dim * 4
        assert baseline["kv_cache_bytes_per_image"] == per_token * grid * grid, batch
        for scale in (2, 3, 4):
            row = rows[f"tokenpacker-s{scale}"]
            assert row["image_tokens"] == (grid // scale) ** 2
            fraction = Fraction(row["kv_cache_bytes_per_image"], baseline["kv_cache_bytes_per_image"])
            assert fraction == Fraction(1, scale * scale), (batch, scale)
            assert row["images_per_s"] > 0
    for scale in (2, 3, 4):
        row = results["base"]["1"][f"tokenpacker-s{scale}"]
        for key in ("vision", "projector", "prefill", "ttft"):
            assert row["median_s"][key] > 0 and row["ratio"][key] > 0 and row["flop_ratio"][key] > 0
        assert row["decode_tokens_per_s"] > 0 and row["memory"]["peak_working_bytes"] >= 0
        # The tower stops at the deepest layer the projector reads, so it does fewer FLOPs than LLaVA's.
        assert row["flop_ratio"]["vision"] < 1
    assert results["targets"]["kv_per_image_exact_fraction"]["met"]
    assert {"llava-1.5-mlp", "tokenpacker-s2", "tokenpacker-s3", "tokenpacker-s4"} == results["projector_step"][
        "rows"
    ].keys()

    # HD token counts: TokenPacker's (n + 1)(T + 1) against LLaVA-NeXT's anyres packing.
    for label, hd_rows in results["hd"].items():
        ours, llava_next = hd_rows["tokenpacker-s2"], hd_rows["llava-next"]
        rows_, cols = ours["grid"]
        assert ours["image_tokens"] == (rows_ * cols + 1) * ((grid // 2) ** 2 + 1), label
        assert llava_next["image_tokens"] == grid * grid + rows_ * grid * (cols * grid + 1), label
        assert ours["ttft"] > 0 and llava_next["ttft"] > 0


def test_bench_convert_memory_smoke(tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    run_script("bench_convert_memory.py", "--workdir", str(workdir), "--output", str(tmp_path / "result.json"))
    report = json.loads((tmp_path / "result.json").read_text())
    assert report["peak_rss_bytes"] > 0 and report["largest_shard_bytes"] > 0 and report["shards"] == 3
    assert report["peak_over_largest_shard"] == report["peak_rss_bytes"] / report["largest_shard_bytes"]
    assert not any(workdir.iterdir())  # the multi-file checkpoint and its conversion are cleaned up


def test_gpu_suite_smoke(tmp_path):
    """The GPU suite's CPU rehearsal: every stage runs in the current environment and writes every JSON file and
    field that plot_gpu.py and docs/performance.md read."""
    out = tmp_path / "out"
    process = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_suite.sh"), "--smoke", str(out)],
        cwd=REPO,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert process.returncode == 0, process.stdout[-4000:] + process.stderr[-2000:]
    suite = json.loads((out / "suite.json").read_text())
    assert suite["smoke"] and suite["device"] == "cpu"
    assert list(suite["stages"]) == ["env", "projector", "sdpa", "e2e", "train", "compile", "report"]
    assert all(stage["rc"] == 0 and not stage["timed_out"] for stage in suite["stages"].values()), suite
    assert all((out / "logs" / f"{stage}.log").exists() for stage in suite["stages"])

    env = json.loads((out / "env.json").read_text())
    assert env["ok"] and all(row["ok"] for row in env["requirements"].values())
    assert env["tokenpacker_hf"] == "src/tokenpacker_hf"  # the suite puts src/ first, as on the GPU machine
    assert {"python", "torch", "transformers", "cuda", "cudnn", "packages", "c_compiler", "python_h"} <= env.keys()

    projector = json.loads((out / "projector.json").read_text())
    assert {(row["batch"], row["dtype"]) for row in projector["results"]} == {
        (batch, dtype) for batch in (1, 8, 32) for dtype in ("fp32", "bf16")
    }
    assert projector["matmul_gflops"].keys() == {"fp32", "bf16"} and projector["max_abs_diff"] <= 1e-5
    assert all(row["speedup_vs_original"] > 0 and row["ours_fraction_of_matmul"] > 0 for row in projector["results"])

    sdpa = json.loads((out / "sdpa.json").read_text())
    assert sdpa["complete"] and [row["batch"] for row in sdpa["rows"]] == [1, 8, 32]
    for row in sdpa["rows"]:
        backends = row["backends"]
        assert backends.keys() == {"default", "flash", "efficient", "cudnn", "math"}
        assert backends["math"]["ok"]  # the math path runs anywhere
        taken = row["profile"]["backend_taken"]
        assert taken in backends and backends[taken]["ok"], row["profile"]
        for backend in backends.values():
            if backend["ok"]:
                assert backend["ms"] > 0 and backend["max_abs_diff_vs_default"] < 0.1
            else:
                assert backend["error"]

    compile_ = json.loads((out / "compile.json").read_text())
    assert compile_["complete"] and [(row["batch"], row["mode"]) for row in compile_["rows"]] == [
        (1, "default"),
        (1, "reduce-overhead"),
    ]
    assert all(row["close"] and row["compile_s"] > 0 and row["compiled_ms"] > 0 for row in compile_["rows"])

    e2e = json.loads((out / "e2e.json").read_text())
    assert list(e2e["base"]) == ["1", "2"] and e2e["hd"] and e2e["targets"]
    for row in e2e["base"]["1"].values():
        assert row["median_s"]["ttft"] > 0 and row["decode_tokens_per_s"] > 0 and row["kv_cache_bytes_per_image"] > 0
        assert row["flop_ratio"]["ttft"] > 0

    train = json.loads((out / "train.json").read_text())
    rows = train["rows"]
    assert train["complete"] and list(rows) == ["llava-1.5-mlp", "tokenpacker-s2"]
    assert rows["llava-1.5-mlp"]["batch"] == rows["tokenpacker-s2"]["batch"]  # equal batch
    assert rows["tokenpacker-s2"]["image_tokens"] * 4 == rows["llava-1.5-mlp"]["image_tokens"]
    for row in rows.values():
        assert row["steps_per_s"] > 0 and not row["vision_tower_trainable"]
        assert row["losses"][-1] < row["losses"][0]  # the optimizer steps really update the weights
    assert train["tokenpacker_s2_steps_per_s_ratio"] > 0

    report = (out / "report.md").read_text()
    for title in (
        "Environment",
        "Projector against the original formulation",
        "End to end",
        "Which SDPA backend the region attention takes",
        "Stage-2 training steps",
        "torch.compile of the projector",
    ):
        assert f"\n### {title}\n" in report
    assert "No result" not in report and report in process.stdout
    assert (out / "gpu.png").stat().st_size > 0


def test_plot_gpu_names_missing_stages(tmp_path):
    """A stage that wrote no JSON is reported with the reason from suite.json, in the tables and the plot."""
    spec = importlib.util.spec_from_file_location("plot_gpu", BENCHMARKS / "plot_gpu.py")
    plot_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_gpu)
    stage = {"rc": 0, "seconds": 1, "limit_s": 60, "timed_out": False}
    stages = {
        "env": dict(stage, rc=1),
        "projector": dict(stage, rc=124, limit_s=90, timed_out=True),
        "sdpa": dict(stage, rc=None, limit_s=0),
    }
    (tmp_path / "suite.json").write_text(
        json.dumps({"smoke": False, "device": "cuda", "budget_s": 450, "stages": stages})
    )
    report = plot_gpu.main([str(tmp_path), "--plot", str(tmp_path / "gpu.png")])
    assert "No result (exit status 1; see logs/env.log)" in report
    assert "No result (timed out after 90 s; see logs/projector.log)" in report
    assert "No result (skipped: budget spent)." in report
    assert "No result (not run)." in report
    assert (tmp_path / "gpu.png").stat().st_size > 0


def test_bench_compose_memory_smoke(tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    run_script("bench_compose_memory.py", "--workdir", str(workdir), "--output", str(tmp_path / "result.json"))
    report = json.loads((tmp_path / "result.json").read_text())
    assert report["peak_rss_bytes"] > 0 and report["llm_shards"] == 3
    assert report["model_bytes"] == report["tower_bytes"] + report["llm_bytes"] > 0
    assert report["peak_over_model"] == report["peak_rss_bytes"] / report["model_bytes"]
    assert not any(workdir.iterdir())  # both parts are cleaned up


def test_bench_image_memory_smoke(tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    process = run_script("bench_image_memory.py", "--workdir", str(workdir), "--output", str(tmp_path / "result.json"))
    report = json.loads((tmp_path / "result.json").read_text())
    [row] = report["rows"]
    for column in ("exact", "box_reduce"):
        assert row[column]["growth_mib"] > 0 and row[column]["seconds"] > 0 and len(row[column]["runs"]) == 1
        assert row[column]["grid"] == [2, 3]
    assert row["exact_over_box_reduce"]["seconds"] == row["exact"]["seconds"] / row["box_reduce"]["seconds"]
    assert row["rgb_copy_mib"] == 1600 * 1200 * 3 / 2**20 and row["file_bytes"] > 0
    assert "| default / box-reduce |" in process.stdout
    assert not any(workdir.iterdir())  # the photo is deleted
