"""The benchmark suite runs end to end in --smoke mode (tiny model, tiny sizes): every section
produces its figures and the results files; timings themselves are not checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import has_module

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[1]


def run_smoke(tmp_path, sections: str) -> dict:
    """``python -m benchmarks --smoke`` exactly as ``make bench`` runs it, from the repo root."""
    env = {**os.environ, "DINO_BENCH_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "benchmarks", "--smoke", "--only", sections]
    proc = subprocess.run(
        [*cmd, "--out", str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".md")
    assert "-smoke-" in files[0]
    result = json.loads((tmp_path / "out" / files[0]).read_text())
    assert result["mode"] == "smoke"
    assert "| model | batch | path |" in (tmp_path / "out" / files[1]).read_text() or (
        "engine" not in result
    )
    assert result["machine"]["cpu"] and result["machine"]["versions"]["onnxruntime"]
    return result


@pytest.mark.slow
def test_engine_and_search_sections(tmp_path):
    result = run_smoke(tmp_path, "engine,search")
    engine = result["engine"]
    from artifact.cpu import cpu_flags
    from benchmarks.ceiling import NATIVE

    flags = set(cpu_flags())
    assert engine["gemm_gflops"]["fp32"] > 0
    for precision, needs in NATIVE.items():  # measured only where the CPU has instructions
        assert (precision in engine["gemm_gflops"]) == bool(needs & flags)
    paths = {r["path"] for r in engine["speed"]}
    assert {"torch_fp32", "ort_fp32", "ort_int8"} <= paths
    for row in engine["speed"]:
        assert row["img_s"] > 0 and row["gflops"] > 0
        if row["path"] == "torch_fp32":
            assert row["x_torch_fp32"] == 1.0
    acc = {r["path"]: r for r in engine["accuracy"]}
    assert acc["ort_fp32"]["cosine_min"] > 0.99999 and acc["ort_fp32"]["knn_delta_points"] == 0
    assert acc["torch_fp32"]["cosine_min"] > 0.9999  # same seeded weights as the artifact
    assert 0.9 < acc["ort_int8"]["cosine_min"] <= 1.0 and "knn_top1" in acc["ort_int8"]
    if "ov_bf16" in acc:
        assert acc["ov_bf16"]["cosine_min"] > 0.999
    if has_module("openvino") and has_module("nncf"):  # the static int8 IR, exported and run
        assert "ov_int8" in paths and "knn_delta_points" in acc["ov_int8"]
        assert 0.5 < acc["ov_int8"]["cosine_min"] <= 1.0
    rows = result["search"]["rows"]
    flat = [r for r in rows if r["index"].startswith("flat")]
    assert flat and all(r["recall_at_10"] == 1.0 for r in flat)
    assert {r["index"].split()[0] for r in rows} == {"flat", "hnsw", "ivf"}
    assert result["search"]["store"]["recall_at_10"] > 0.9
    assert result["search"]["http"]["p50_ms"] > 0 and result["search"]["http"]["requests"] == 20


@pytest.mark.slow
def test_http_and_train_sections(tmp_path):
    result = run_smoke(tmp_path, "http,train")
    server = result["http"]["servers"][0]
    assert server["engine"] == "onnxruntime-fp32" and server["cold_start_s"] > 0
    embed = [r for r in server["load"] if r["endpoint"] == "/embed"]
    assert [r["concurrency"] for r in embed] == [1, 4]
    assert all(r["errors"] == 0 and r["img_s"] > 0 and r["x_raw_engine"] > 0 for r in embed)
    # Decoding is real work, so the cores leave the server less than the whole raw engine.
    assert result["http"]["preprocess_cpu_ms"] > 0
    assert all(0 < r["cpu_ceiling"] < 1 for r in embed)
    assert any(r["endpoint"] == "/attention" and r["errors"] == 0 for r in server["load"])
    # Default settings: the server chose by measurement, said what from GET /models, and the
    # restart reused that choice; its load is compared with the raw engine it chose.
    auto = result["http"]["servers"][-1]
    assert auto["engine"] == "auto" and auto["chose"]["engine"] in ("onnxruntime", "openvino")
    assert len(auto["candidates_img_s"]) >= 2 and auto["measured_s"] > 0
    assert auto["cold_start_s"] > 0 and auto["restart_s"] > 0 and auto["raw_best_img_s"] > 0
    assert all(r["errors"] == 0 for r in auto["load"])
    recipes = {(r["recipe"], r["precision"]) for r in result["train"]["rows"]}
    assert {("quickstart", "fp32"), ("vit_small", "fp32")} <= recipes


@pytest.mark.slow
def test_build_section(tmp_path):
    """The real build CLI over real JPEG files, in a fresh index with the engine choice cached by
    a first build, against the raw engine it chose; the markdown has its table."""
    build = run_smoke(tmp_path, "build")["build"]
    assert build["images"] == 16 and build["chose"]["engine"] in ("onnxruntime", "openvino")
    assert len(build["candidates_img_s"]) >= 2 and build["choice_measured_s"] > 0
    assert [r["round"] for r in build["rounds"]] == [1]
    for key in ("build_img_s", "end_to_end_img_s", "raw_best_img_s", "x_raw_engine"):
        assert build[key] > 0, key
    assert build["x_raw_engine"] == build["build_img_s"] / build["raw_best_img_s"]
    assert 0 < build["raw_one_call_img_s"] <= build["raw_best_img_s"]
    # End to end pays the process start and the model load, which the build's own rate leaves out.
    assert build["end_to_end_img_s"] < build["build_img_s"]
    assert build["rounds"][0]["raw_best_batch"] in build["raw_batches"]
    markdown = next((tmp_path / "out").glob("*.md")).read_text()
    assert "## Bulk embedding" in markdown and "| median |" in markdown


@pytest.mark.slow
def test_memory_section(tmp_path):
    rows = {r["shape"]: r for r in run_smoke(tmp_path, "memory")["memory"]["rows"]}
    assert rows["one_huge_png"]["statuses"] == "200" and rows["64_huge_png"]["statuses"] == "413"
    assert all(r["peak_rss_mb"] >= r["rss_before_mb"] > 0 for r in rows.values())


@pytest.mark.slow
def test_server_variants_measure_every_variant(tmp_path):
    pytest.importorskip("openvino")
    env = {**os.environ, "DINO_BENCH_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "variants.json"
    cmd = [sys.executable, "-m", "benchmarks.server_variants", "--smoke", "--seconds", "0.5"]
    cmd += ["--rounds", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rates = json.loads(out.read_text())["img_s"]
    assert set(rates) == {f"{v} c={c}" for v in ("default", "h11", "unpinned") for c in (1, 32)}
    assert all(r[0] > 0 for r in rates.values()), rates
