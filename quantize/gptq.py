"""Quantize a checkpoint with GPTQ: `python quantize/gptq.py --bits 4` == `litquant quantize gptq --bits 4`."""

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python quantize/gptq.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from litquant.errors import run_job  # noqa: E402
from litquant.jobs.quantize import gptq as main  # noqa: E402

if __name__ == "__main__":
    run_job(main)
