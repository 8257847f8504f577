"""A benchmark report as a terminal table, Markdown, a PNG chart (decode speed against memory) and JSON files.

A report is the dict `litquant benchmark` returns: environment, settings, bandwidth and one result per mode.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _unit(results: list[dict]) -> tuple[str, float]:
    """GB, or MB when every model in the table is under 1 GB of weights (the bundled one is a few MB)."""
    ok = [r["weight_bytes"] for r in results if "error" not in r]
    return ("MB", 1e6) if ok and max(ok) < 1e9 else ("GB", 1e9)


def table_rows(results: list[dict], roofline: bool) -> tuple[list[str], list[list[str]]]:
    unit, div = _unit(results)
    cols = [
        "mode",
        "load s",
        f"weights {unit}",
        f"peak mem {unit}",
        "prefill tok/s",
        "decode tok/s",
        "TTFT ms",
        "tok/s",
        "perplexity",
    ] + (["% of BW roofline"] if roofline else [])
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["mode"], r["error"]] + [""] * (len(cols) - 2))
            continue
        row = [
            r["mode"],
            _fmt(r["load_s"], ".2f"),
            _fmt(r["weight_bytes"] / div, ".3f"),
            _fmt(r["peak_memory_bytes"] / div, ".3f"),
            _fmt(r["prefill_tokens_per_sec"], ".1f"),
            _fmt(r["decode_tokens_per_sec"], ".1f"),
            _fmt(r["time_to_first_token_s"] * 1000, ".1f"),
            _fmt(r["tokens_per_sec"], ".1f"),
            _fmt(r["perplexity"], ".3f"),
        ]
        if roofline:
            row.append(_fmt(r.get("roofline_fraction") and 100 * r["roofline_fraction"], ".1f"))
        rows.append(row)
    return cols, rows


def header(report: dict) -> str:
    """Two lines: what ran where, and with which settings."""
    env, s = report["environment"], report["settings"]
    what = f"{s['model_name']} (random init)" if s["random_init"] else s["checkpoint_dir"]
    return (
        f"{what} on {env['device_name']}; torch {env['torch']}, bitsandbytes {env['bitsandbytes']}, "
        f"commit {env['commit']}, {env['date']}\n"
        f"prompt {s['prompt_tokens']} tokens, {s['max_new_tokens']} new tokens (greedy), "
        f"median of {s['runs']} runs "
        f"after {s['warmup']} warm-up; perplexity: first {s['ppl_tokens']} held-out tokens"
        + (", compiled decode step (static KV cache)" if s["compile"] else "")
    )


def format_terminal(report: dict) -> str:
    cols, rows = table_rows(report["results"], report["bandwidth"] is not None)
    failed = {i for i, r in enumerate(report["results"]) if "error" in r}
    widths = [
        max([len(c), *(len(r[i]) for j, r in enumerate(rows) if j not in failed or i == 0)])
        for i, c in enumerate(cols)
    ]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [header(report), "", line(cols), line(["-" * w for w in widths])]
    out += [f"{r[0].ljust(widths[0])}  {r[1]}" if j in failed else line(r) for j, r in enumerate(rows)]
    return "\n".join(out)


def format_markdown(report: dict) -> str:
    cols, rows = table_rows(report["results"], report["bandwidth"] is not None)
    env = report["environment"]
    out = [
        f"## {env['device_name']}",
        "",
        header(report).replace("\n", "  \n"),
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|",
    ]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    out.append("")
    where = "the mode's own process" if report["settings"]["isolate"] else "the one process all modes ran in"
    out.append(
        "Peak memory: "
        + (
            "CUDA peak allocated bytes"
            if env["device"] == "cuda"
            else "peak resident set (Python/torch libraries included)"
        )
        + f" of {where}."
    )
    return "\n".join(out) + "\n"


def write_chart(report: dict, path: Path) -> Optional[Path]:
    """decode tokens/sec against peak memory, one labelled point per mode (needs matplotlib: the `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "Skipping the PNG chart: matplotlib is not installed (pip install 'litquant[plot]')",
            file=sys.stderr,
        )
        return None
    ok = [r for r in report["results"] if "error" not in r]
    unit, div = _unit(ok)
    # CPU peak RSS is mostly the Python/torch libraries for small models: weights show the modes apart better
    key, what = (
        ("peak_memory_bytes", "peak memory")
        if report["environment"]["device"] == "cuda"
        else ("weight_bytes", "weight memory")
    )
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for r in ok:
        x, y = r[key] / div, r["decode_tokens_per_sec"]
        ax.scatter([x], [y], s=40)
        label = r["mode"] + (f"\nppl {r['perplexity']:.2f}" if r["perplexity"] is not None else "")
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel(f"{what} ({unit})")
    ax.set_ylabel("decode tokens/sec (median)")
    env, s = report["environment"], report["settings"]
    name = s["model_name"] if s["random_init"] else Path(s["checkpoint_dir"]).name
    ax.set_title(f"{name} on {env['device_name'][:60]}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(0.2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(report: dict, out_dir: Path) -> list[Path]:
    """benchmark.json, benchmark.md and (with matplotlib) benchmark.png in `out_dir`; returns what was written."""
    from litquant.io import atomic_write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "benchmark.json", json.dumps(report, indent=2))
    atomic_write_text(out_dir / "benchmark.md", format_markdown(report))
    written = [out_dir / "benchmark.json", out_dir / "benchmark.md"]
    if write_chart(report, out_dir / "benchmark.png"):
        written.append(out_dir / "benchmark.png")
    print("Wrote " + ", ".join(map(str, written)), file=sys.stderr)
    return written
