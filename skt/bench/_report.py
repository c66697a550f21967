"""Results as a text table, a Markdown table, a chart and JSON files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from skt._utils import expand_path
from skt.bench._machine import format_machine

__all__ = ["METRICS", "format_table", "markdown_table", "plot_results", "write_results"]

METRICS = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc")
"""Keys of each row's ``metrics``, in table order."""

_HEADERS = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced acc.",
    "f1_macro": "macro-F1",
    "roc_auc": "ROC-AUC",
    "fit_seconds": "fit s",
    "predict_seconds": "predict s",
}


def _protocol_text(n_images: int, protocol: dict) -> str:
    if protocol["kind"] == "fixed split":
        return (f"Protocol: the given split of {n_images} images, {protocol['n_train'][0]} for "
                f"training and {protocol['n_test'][0]} for testing.")
    if protocol["kind"] == "split":
        return (f"Protocol: one stratified split of {n_images} images, "
                f"{protocol['n_train'][0]} for training and {protocol['n_test'][0]} for "
                f"testing (seed {protocol['random_state']}).")
    return (f"Protocol: stratified {protocol['n_splits']}-fold cross-validation of "
            f"{n_images} images (seed {protocol['random_state']}); mean ± std over folds.")


def _cell(row: dict, key: str) -> str:
    if key in row["metrics"]:
        value, spread = row["metrics"][key], row["metrics_std"][key]
        if value is None or np.isnan(value):
            return "n/a"
        return f"{value:.3f}" + (f" ± {spread:.3f}" if len(row["folds"]) > 1 else "")
    return f"{row[key]:.1f}"


def _columns() -> list[str]:
    return [*METRICS, "fit_seconds", "predict_seconds"]


def _reference_text(references: list[dict]) -> list[str]:
    return [f"{ref['label']}: {100 * ref['accuracy']:.2f} % accuracy ({ref['source']})"
            for ref in references]


def format_table(results: dict) -> str:
    """The rows as a plain-text table, followed by the published references."""
    columns = _columns()
    header = ["row", *(_HEADERS[c] for c in columns)]
    lines = [[row["name"], *(_cell(row, c) for c in columns)] for row in results["rows"]]
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]

    def render(cells):
        return "  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                         for i, cell in enumerate(cells))

    text = [results["title"], render(header), "  ".join("-" * w for w in widths)]
    text += [render(line) for line in lines]
    if results["references"]:
        text.append("Published reference, not measured here:")
        text += [f"  {line}" for line in _reference_text(results["references"])]
    return "\n".join(text)


def markdown_table(results: dict) -> str:
    """The rows as a Markdown table with notes on protocol, timing and references."""
    columns = _columns()
    lines = [
        "| " + " | ".join(["Row", *(_HEADERS[c] for c in columns)]) + " |",
        "|---" + "|---:" * len(columns) + "|",
    ]
    for row in results["rows"]:
        lines.append("| " + " | ".join([row["name"], *(_cell(row, c) for c in columns)]) + " |")
    n = sum(results["protocol"]["n_train"][:1] + results["protocol"]["n_test"][:1])
    notes = ["", _protocol_text(n, results["protocol"]) + " Heads tuned by grid search on the "
             "training part only."]
    dataset = results["dataset"]
    if dataset.get("name"):
        details = [dataset.get("note"), dataset.get("licence") and f"licence {dataset['licence']}"]
        notes.append(f"Data: {dataset['name']}" + "".join(f"; {d}" for d in details if d) + ".")
    shared = [f"{name} ({log['description']}, {log['seconds']:.1f} s for all images)"
              for name, log in results["inputs"].items()]
    if shared:
        notes.append("Fit and predict seconds include each row's share of computing its input "
                     "once for all images: " + "; ".join(shared) + ".")
    notes.append(format_machine(results["machine"]) + ".")
    if results["references"]:
        notes.append("Published reference, not measured here: "
                     + "; ".join(_reference_text(results["references"])) + ".")
    return "\n".join(lines + [f"{note}\n" if note else note for note in notes])


def plot_results(results: dict, path: str | os.PathLike) -> Path:
    """Bar chart of accuracy and balanced accuracy per row, best first.

    Published references are dashed horizontal lines. Needs matplotlib
    (``pip install 'skt[bench]'``); no pyplot state is touched.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("The chart needs matplotlib: pip install matplotlib "
                          "(or pip install 'skt[bench]').") from exc
    rows = sorted(results["rows"], key=lambda r: r["metrics"]["accuracy"], reverse=True)
    positions = np.arange(len(rows))
    figure = Figure(figsize=(max(7.0, 0.9 * len(rows) + 3), 5.5), layout="constrained")
    axes = figure.add_subplot()
    for offset, key, label in ((-0.2, "accuracy", "accuracy"),
                               (0.2, "balanced_accuracy", "balanced accuracy")):
        values = [r["metrics"][key] for r in rows]
        errors = [r["metrics_std"][key] for r in rows] if len(rows[0]["folds"]) > 1 else None
        bars = axes.bar(positions + offset, values, width=0.4, yerr=errors, label=label,
                        capsize=3)
        if key == "accuracy":
            axes.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    styles = ("--", ":", "-.")
    for i, reference in enumerate(results["references"]):
        axes.axhline(reference["accuracy"], color="0.3", linestyle=styles[i % len(styles)],
                     linewidth=1.2,
                     label=f"{reference['label']} ({100 * reference['accuracy']:.2f} %, published)")
    axes.set_xticks(positions, [r["name"] for r in rows], rotation=30, ha="right", fontsize=8)
    low = min(r["metrics"]["balanced_accuracy"] for r in rows)
    axes.set_ylim(max(0.0, min(0.5, low) - 0.05), 1.0)
    axes.set_ylabel("score on held-out images")
    axes.grid(axis="y", alpha=0.3)
    axes.set_title(results["title"], fontsize=10)
    figure.legend(fontsize=8, loc="outside lower center", ncols=2, frameon=False)
    path = expand_path(path)
    figure.savefig(path, dpi=120)
    return path


def write_results(results: dict, output: str | os.PathLike, chart: bool = True) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and (with ``chart``) ``results.png``.

    Returns
    -------
    dict
        ``{"json": path, "markdown": path, "chart": path}`` (no ``"chart"``
        without it).
    """
    output = expand_path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = {"json": output / "results.json", "markdown": output / "results.md"}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    paths["markdown"].write_text(f"### {results['title']}\n\n{markdown_table(results)}",
                                 encoding="utf-8")
    if chart:
        paths["chart"] = plot_results(results, output / "results.png")
    return paths
