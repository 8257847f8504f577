"""benchmarks/gpu_check.sh --dry-run: the device check's every stage, end to end on CPU with the tiny model."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run(tmp_path):
    p = subprocess.run(
        [
            "bash",
            str(REPO / "benchmarks" / "gpu_check.sh"),
            "--dry-run",
            "--out",
            str(tmp_path),
            "--budget",
            "400",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] and set(report["stages"]) == {"decode", "qlora", "gptq"}
    decode = report["stages"]["decode"]
    assert [r["mode"] for r in decode["results"]] == [
        "bf16-true",
        "bnb.nf4",
        "bnb.nf4-dq",
        "bnb.int8",
        "gptq.int4",
    ]
    assert all(r["decode_tokens_per_sec"] > 0 for r in decode["results"]), decode
    qlora, gptq = report["stages"]["qlora"], report["stages"]["gptq"]
    assert qlora["step_s"] > 0 and qlora["peak_gb"] > 0 and qlora["loss"] == qlora["loss"]  # finite
    assert gptq["blocks"] == 2 and gptq["extrapolated_s"] == gptq["per_block_s"] * gptq["n_layer"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "dry run" in md and "bnb.nf4" in md
    assert (tmp_path / "cuda_tests.log").is_file()


def test_gpu_check_rejects_unknown_arguments():
    p = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--bogus"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert p.returncode == 2 and "unknown argument --bogus" in p.stderr
