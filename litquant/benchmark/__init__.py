"""`litquant benchmark`: every precision/quantization mode of one checkpoint, measured and tabulated.

`modes` names and checks the modes, `measure` measures one (in a process of its own), `environment` describes
the machine and `report` writes the tables and chart; the job itself is `litquant.jobs.benchmark.main`.
See "## Benchmarks" in docs/ARCHITECTURE.md.
"""

from litquant.benchmark.environment import CPU_MMAP_THRESHOLD, cpu_name, environment, git_commit
from litquant.benchmark.measure import (
    MeasureSpec,
    benchmark_prompt,
    measure_in_subprocess,
    measure_mode,
    random_model,
)

__all__ = [
    "CPU_MMAP_THRESHOLD",
    "MeasureSpec",
    "benchmark_prompt",
    "cpu_name",
    "environment",
    "git_commit",
    "measure_in_subprocess",
    "measure_mode",
    "random_model",
]
