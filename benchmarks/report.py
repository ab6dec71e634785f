"""Results file names and the markdown rendering of a run."""

from __future__ import annotations

import re
from pathlib import Path

from benchmarks.common import SECTIONS


def result_stem(result: dict) -> str:
    """``2025-11-25-intel-xeon-processor``, + ``-quick``/``-smoke`` for shortened runs and the
    section names for a partial run (``-search``)."""
    cpu = re.sub(r"\(r\)|\(tm\)|cpu|@.*", "", result["machine"]["cpu"].lower())
    cpu = re.sub(r"[^a-z0-9]+", "-", cpu).strip("-") or "cpu"
    suffix = "" if result["mode"] in ("default", "full") else f"-{result['mode']}"
    # A partial run: its sections in the name, so it does not overwrite a whole run's files.
    if result.get("sections") and len(result["sections"]) < len(SECTIONS):
        suffix += "-" + "-".join(result["sections"])
    family = re.sub(r"[^a-z0-9]+", "-", result["machine"].get("cpu_family", "").lower())
    family = f"-{family.strip('-')}" if family.strip("-") else ""
    return f"{result['date'][:10]}-{cpu}{family}{suffix}"


def _fmt(value: object, column: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and column.startswith("cosine"):
        return f"{value:.6f}"
    if isinstance(value, float) and column.startswith("recall"):
        return f"{value:.4f}"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 0.99 and abs(value) < 1.0:
            return f"{value:.5f}"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def table(rows: list[dict], columns: list[str]) -> list[str]:
    if not rows:
        return ["(none)"]
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(_fmt(r.get(c), c) for c in columns) + " |" for r in rows]
    return out


def _engine(eng: dict) -> list[str]:
    lines = ["## Engine", ""]
    lines.append(
        "GEMM ceilings (GFLOP/s, this run): "
        + ", ".join(f"{k} {v:,.0f}" for k, v in eng["gemm_gflops"].items())
        + "; GFLOP per image: "
        + ", ".join(f"{k} {v}" for k, v in eng["gflop_per_image"].items())
    )
    lines += ["", "Paths: " + "; ".join(f"`{k}` {v}" for k, v in eng["paths"].items()), ""]
    cols = ["model", "batch", "path", "img_s", "x_torch_fp32", "x_ort_fp32", "gflops"]
    lines += table(eng["speed"], [*cols, "ceiling_fraction"])
    lines += ["", "Accuracy vs onnxruntime fp32 (photos: cosine; digits: leave-one-out k-NN)", ""]
    cols = ["model", "path", "photos", "cosine_min", "cosine_mean", "knn_top1", "knn_delta_points"]
    lines += table(eng["accuracy"], cols)
    return lines


def _http(http: dict) -> list[str]:
    lines = ["## HTTP", ""]
    if "preprocess_cpu_ms" in http:
        lines += [
            f"Decode + eval transform: {http['preprocess_cpu_ms']:.2f} CPU ms per image. "
            "cpu_ceiling: the highest x_raw_engine the shared cores allow once that and the "
            "load generator's CPU are paid (HTTP parsing not counted, so an upper bound); "
            "server_cores: cores the server process kept busy in the timed window; "
            "server_cpu_ms: its CPU per request, inference included; x_raw_batch1 (c=1): against "
            "the raw engine at batch 1, the only batch a lone client's request can be.",
            "",
        ]
    for server in http["servers"]:
        lines.append(
            f"### engine `{server['engine']}`, {server['model']}: cold start "
            f"{_fmt(server['cold_start_s'])} s, raw engine best {_fmt(server['raw_best_img_s'])} "
            f"img/s (batch {server['raw_best_batch']}, {server.get('raw_best_streams', 1)} "
            "stream(s)); client_cpu_ms: the load generator's own CPU per request, on the same cores"
        )
        if "chose" in server:
            lines += ["", _auto_line(server)]
        lines.append("")
        cols = ["endpoint", "concurrency", "req_s", "img_s", "p50_ms", "p95_ms", "p99_ms"]
        cols += ["x_raw_engine", "x_raw_batch1", "cpu_ceiling", "x_torch_fp32", "client_cpu_ms"]
        cols += ["server_cores", "server_cpu_ms", "errors"]
        lines += table(server["load"], cols)
        lines.append("")
    return lines


def _auto_line(server: dict) -> str:
    """What the default-settings server chose, from what, and its two start-up times."""
    c = server["chose"]
    rates = ", ".join(f"{k} {_fmt(v)}" for k, v in server["candidates_img_s"].items())
    refused = "; ".join(f"{k}: {why}" for k, why in server["refused_variants"].items())
    return (
        f"Default settings chose **{c['engine']} {c['precision']}** (file variant "
        f"`{c['variant']}`) from candidates measured at start ({rates} img/s, in "
        f"{_fmt(server['measured_s'])} s); refused: {refused or 'none'}. First start "
        f"{_fmt(server['cold_start_s'])} s (measurement included), restart on the same data "
        f"folder {_fmt(server['restart_s'])} s (choice and compiled models cached); x_raw_engine "
        "below is against the engine it chose."
    )


def _build(build: dict) -> list[str]:
    """The bulk build against the raw engine it chose, round by round and the medians."""
    c = build["chose"]
    rates = ", ".join(f"{k} {_fmt(v)}" for k, v in build["candidates_img_s"].items())
    met = "met" if build["x_raw_engine"] >= build["target"] else "**not met**"
    lines = [
        "## Bulk embedding (`python -m service.index build`)",
        "",
        f"{build['images']} JPEG photos (long side {build['long_side_px']} px, "
        f"{_fmt(build['jpeg_kb_mean'])} kB on average), {build['model']}, batch "
        f"{build['batch_size']}. Default settings chose **{c['engine']} {c['precision']}** "
        f"(file variant `{c['variant']}`) from {rates} img/s, measured by a first build in "
        f"{_fmt(build['choice_measured_s'])} s (not timed). build_img_s: what the build reports "
        "(embedding and storing); end_to_end_img_s: process start to exit; raw: the same engine "
        "in-process on pixels made once, batch "
        f"{', '.join(map(str, build['raw_batches']))} (and for OpenVINO 1 or the default "
        "streams); the median row takes the best configuration's median. CPU family "
        f"{build['cpu_family']}; load average {build['load_avg_start']:.2f} -> "
        f"{build['load_avg_end']:.2f}.",
        "",
    ]
    median = {"round": "median", **{k: v for k, v in build.items() if not isinstance(v, dict)}}
    cols = ["round", "build_img_s", "end_to_end_img_s", "raw_best_img_s", "raw_best_batch"]
    cols += ["raw_best_streams", "x_raw_engine", "load_avg"]
    lines += table([*build["rounds"], median], cols)
    target = f"{build['target']:.2f}"
    return lines + [
        "",
        f"Target: the build at >= {target} of the raw engine: {met}. The raw engine at the "
        f"build's batch ({build['batch_size']}), one call at a time with every thread on it: "
        f"{_fmt(build['raw_one_call_img_s'])} img/s, the build {_fmt(build['x_raw_one_call'])} "
        "of that.",
    ]


def _search(search: dict) -> list[str]:
    lines = ["## Search (clustered 384-d Gaussian mixture)", ""]
    cols = ["n", "index", "params", "build_s", "recall_at_10", "p50_ms", "p99_ms"]
    lines += table(search["rows"], [*cols, "bytes_per_vector", "gb_per_million"])
    for key in ("store", "http"):
        if search.get(key):
            lines += ["", f"{key}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in search[key].items())]
    return lines


def _memory(memory: dict) -> list[str]:
    from benchmarks.memory_bench import markdown  # it imports this module

    return markdown(memory)


def _train(train: dict) -> list[str]:
    lines = ["## Training step throughput (one pre-made batch; file loading excluded)", ""]
    cols = ["recipe", "precision", "batch", "img_s", "x_fp32"]
    return lines + table(train["rows"], cols)


def write_markdown(result: dict, path: Path) -> None:
    m = result["machine"]
    lines = [
        f"# Benchmark results: {m['cpu']} ({m.get('cpu_family', 'unknown family')}), "
        f"{result['date']}",
        "",
        f"`{result['command']}` ({result['mode']} mode), {result['threads']} threads, "
        f"{m['cores']} cores, flags {', '.join(m['cpu_flags'])}; load average at start "
        f"{m['load_avg'][0]:.2f}, at end {m.get('load_avg_end', [0])[0]:.2f}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v),
        "",
    ]
    renders = (
        ("engine", _engine),
        ("http", _http),
        ("build", _build),
        ("search", _search),
        ("train", _train),
        ("memory", _memory),
    )
    for key, render in renders:
        if key in result and "error" in result[key]:
            lines += [f"## {key}", "", f"FAILED: {result[key]['error']}", ""]
        elif key in result:
            lines += render(result[key]) + [""]
    path.write_text("\n".join(lines))
