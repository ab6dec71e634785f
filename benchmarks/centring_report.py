"""Write the centring benchmark's JSON and Markdown results."""

from __future__ import annotations

import json
from pathlib import Path


def _table(header: list[str], rows: list[list[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def markdown(r: dict) -> str:
    m = r["machine"]
    knn = r["knn_setup"]
    lines = [
        f"# Centring and near-duplicates: {r['model']} ({r['arch']})",
        "",
        f"CPU: {m['cpu']} ({m['cores']} cores, load average {m['load_avg'][0]:.1f}); "
        f"{r['seconds']} s. Command: `python -m benchmarks.centring --model models/{r['model']}`.",
        "",
        f"## Weighted k-NN top-1 on Fashion-MNIST (k={knn['k']}, T={knn['temperature']}, "
        f"{knn['train']} train / {knn['test']} test images)",
        "",
        *_table(["embeddings", "top-1 %"], [[k, v] for k, v in r["knn_top1"].items()]),
        "",
        f"## Scores: unrelated pairs vs augmented copies ({r['pairs_setup']['originals']} test "
        f"images, {r['pairs_setup']['unrelated_pairs']} random pairs; p5 / median / p95)",
        "",
    ]
    rows = []
    for name, s in r["scores"].items():
        u, c = s["unrelated"], s["copies"]
        by = s["copies_by_augmentation"]
        rows.append(
            [name, f"{u['p5']} / **{u['median']}** / {u['p95']}",
             f"{c['p5']} / **{c['median']}** / {c['p95']}",
             ", ".join(f"{k} {v['median']}" for k, v in by.items())]
        )  # fmt: skip
    lines += _table(["embeddings", "unrelated", "copies", "copy medians by augmentation"], rows)
    cs = r["copy_set"]
    lines += [
        "",
        f"## Copy detection at the default threshold {r['default_threshold']} ({cs['images']} "
        f"images: {cs['originals']} originals with {cs['copies_each']} copies each among "
        f"{cs['distractors']} distractors; pairs scoring above the threshold)",
        "",
    ]
    rows = [
        [name, d["default"]["precision"], d["default"]["recall"], d["default"]["predicted_pairs"]]
        for name, d in r["copy_detection"].items()
    ]
    lines += _table(["embeddings", "precision", "recall", "pairs found"], rows)
    lines += ["", "Threshold sweep (precision / recall):", ""]
    names = list(r["copy_detection"])
    sweeps = [r["copy_detection"][n]["sweep"] for n in names]
    rows = [
        [s[0]["threshold"], *(f"{x[i]['precision']} / {x[i]['recall']}" for x in sweeps)]
        for i, s in enumerate(zip(*sweeps, strict=True))
    ]
    lines += _table(["threshold", *names], rows)
    return "\n".join(lines) + "\n"


def write_results(result: dict, stem: Path) -> None:
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
