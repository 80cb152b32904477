"""What ``tools/evaluate.py`` leaves behind: ``results.json``, two PNG plots, a one-screen summary."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

PPL_PLOT = "ppl_by_position.png"
RETRIEVAL_PLOT = "retrieval_heatmap.png"
RESULTS = "results.json"
SUMMARY = "summary.txt"


def _fmt_len(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def plot_ppl(result: dict, path: Path) -> None:
    """Loss per position bucket (log2 x axis at the bucket's upper end)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buckets = [b for b in result["buckets"] if b["tokens"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([b["end"] for b in buckets], [b["loss"] for b in buckets], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position (bucket end, tokens of context)")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(f"Loss by position, {result['documents']} windows of {_fmt_len(result['length'])} "
                 f"(overall ppl {result['ppl']:.2f})")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_retrieval(result: dict, path: Path) -> None:
    """Exact match per (depth, length) cell, values written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lengths, depths = result["lengths"], result["depths"]
    grid = np.full((len(depths), len(lengths)), np.nan)
    for cell in result["cells"]:
        grid[depths.index(cell["depth"]), lengths.index(cell["length"])] = cell["exact_match"]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 3, 0.6 * len(depths) + 2))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [_fmt_len(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length")
    ax.set_ylabel("needle depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if not math.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(f"{result['task']} retrieval, greedy exact match")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_text(results: dict) -> str:
    lines = [f"checkpoint {results['checkpoint']} (iteration {results['iteration']}), model {results['model']}, "
             f"trained context {_fmt_len(results['trained_length'])}, layout {results['layout']}"]
    ppl: Optional[dict] = results.get("perplexity_by_position")
    if ppl:
        kind = "" if ppl["whole_documents"] else " (slices of the token stream, not whole documents)"
        lines.append(f"perplexity by position: {ppl['documents']} windows of {_fmt_len(ppl['length'])} from "
                     f"{ppl['source']}{kind}")
        lines.append(f"  overall loss {ppl['loss']:.4f}, ppl {ppl['ppl']:.2f}")
        lines.append("  " + " ".join(f"{_fmt_len(b['end']):>6}" for b in ppl["buckets"]) + "  (bucket end)")
        lines.append("  " + " ".join(f"{b['loss']:6.3f}" for b in ppl["buckets"]) + "  (loss)")
    ret: Optional[dict] = results.get("retrieval")
    if ret:
        chance = f", chance {ret['chance']:.2f}" if ret.get("chance") else ""
        lines.append(f"retrieval ({ret['task']}, haystack {ret['haystack']}): {ret['cases']} cases, "
                     f"{len(ret['depths'])} depths x {ret['samples_per_cell']} per length{chance}")
        metrics = ["exact_match", "answer_logprob"] + (["choice_accuracy"] if "choice_accuracy" in ret["by_length"]
                                                       else [])
        lines.append("  " + f"{'length':>8} " + " ".join(f"{m:>16}" for m in metrics))
        for n in ret["lengths"]:
            lines.append("  " + f"{_fmt_len(n):>8} " + " ".join(f"{ret['by_length'][m][str(n)]:16.3f}"
                                                             for m in metrics))
    lines.append(f"({results['seconds']:.1f} s)")
    return "\n".join(lines)


def write_outputs(results: dict, out_dir: Path) -> list[Path]:
    """results.json, the plots of the tasks that ran and summary.txt; returns the files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / RESULTS]
    written[0].write_text(json.dumps(results, indent=2) + "\n")
    if results.get("perplexity_by_position"):
        plot_ppl(results["perplexity_by_position"], out_dir / PPL_PLOT)
        written.append(out_dir / PPL_PLOT)
    if results.get("retrieval"):
        plot_retrieval(results["retrieval"], out_dir / RETRIEVAL_PLOT)
        written.append(out_dir / RETRIEVAL_PLOT)
    (out_dir / SUMMARY).write_text(summary_text(results) + "\n")
    written.append(out_dir / SUMMARY)
    return written
