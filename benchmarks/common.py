"""What the peer benchmarks share: running commands, and a venv for the peer that reuses this interpreter's torch.

Each peer lives in `benchmarks/.venvs/<name>`, made with `--system-site-packages` so it runs on the torch already
installed (never a second torch: a constraints file pins it during installs and the probe checks it afterwards).
The venv's processes never see this repo on PYTHONPATH (its top-level `generate`/`finetune`/`quantize` packages
would shadow the peer's own modules of those names).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "out"
VENVS = REPO / "benchmarks" / ".venvs"

sys.path.insert(0, str(REPO))
from litquant.errors import UserError  # noqa: E402


def sh(
    cmd: list, *, env: Optional[dict] = None, cwd: Path = REPO, timeout: int = 3600
) -> subprocess.CompletedProcess:
    """Run a command, capture its output; a failure is a UserError with the output's tail."""
    p = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
    )
    if p.returncode != 0:
        tail = (p.stdout + p.stderr)[-3000:]
        shown = " ".join("<script>" if "\n" in str(c) else str(c) for c in cmd)[:300]
        raise UserError(f"command failed ({p.returncode}): {shown}\n{tail}")
    return p


def venv_env(**defaults: str) -> dict:
    """This process's environment without PYTHONPATH, plus `defaults` for variables not already set."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for k, v in defaults.items():
        env.setdefault(k, v)
    return env


def probe(py: Path, imports: str, versions: dict[str, str], env: dict) -> Optional[dict]:
    """Run `imports` in the venv and report torch's version/file/CUDA build and the named distributions' versions
    ({key: distribution name}); None when anything fails to import."""
    code = (
        f"import json, torch, importlib.metadata as m; {imports}; print(json.dumps(dict(torch=torch.__version__, "
        f"torch_file=torch.__file__, cuda=torch.version.cuda, "
        + ", ".join(f"{k}=m.version({d!r})" for k, d in versions.items())
        + ")))"
    )
    OUT.mkdir(parents=True, exist_ok=True)
    p = subprocess.run([str(py), "-c", code], capture_output=True, text=True, env=env, cwd=OUT)
    lines = p.stdout.strip().splitlines()
    return json.loads(lines[-1]) if p.returncode == 0 and lines else None


def ensure_venv(
    name: str,
    imports: str,
    versions: dict[str, str],
    ready: Callable[[dict], bool],
    install: Callable[[Path, Path], None],
    env: dict,
) -> tuple[Path, dict]:
    """The venv's python and its probe. `install(python, constraints_file)` runs when the probe fails or `ready`
    says the versions are not the wanted ones; afterwards the venv must import and use this interpreter's torch."""
    venv = VENVS / name
    py = venv / "bin" / "python"
    if not py.exists():
        print(f"Creating {venv} (--system-site-packages: reuses torch {torch.__version__})", flush=True)
        sh([sys.executable, "-m", "venv", "--system-site-packages", venv])
    info = probe(py, imports, versions, env)
    if info is None or not ready(info):
        constraints = venv / "constraints.txt"
        constraints.write_text(f"torch=={torch.__version__}\n")
        install(py, constraints)
        info = probe(py, imports, versions, env)
    if info is None or not ready(info):
        raise UserError(
            f"{imports!r} does not work in {venv} after installing; delete that folder and run again"
        )
    if (
        info["torch"] != torch.__version__
        or Path(info["torch_file"]).resolve() != Path(torch.__file__).resolve()
    ):
        raise UserError(
            f"{venv} has its own torch {info['torch']} at {info['torch_file']} (expected the system's "
            f"{torch.__version__}); delete that folder and run again"
        )
    if info["cuda"] != torch.version.cuda:
        raise UserError(
            f"{venv}: torch CUDA build {info['cuda']} differs from the system's {torch.version.cuda}"
        )
    return py, info


def machine() -> dict:
    """CPU model, cores, torch version/threads, commit (+dirty) and load average: the context of a measurement
    (the CPU name and commit as `litquant benchmark` reports them)."""
    from litquant.benchmark.environment import cpu_name, git_commit

    return dict(
        cpu=cpu_name(),
        cores=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
        commit=git_commit() or "uncommitted",
        loadavg_1m_at_start=round(os.getloadavg()[0], 2),
    )
