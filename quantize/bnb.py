"""Pre-quantize a checkpoint with bitsandbytes: `python quantize/bnb.py --mode nf4` == `litquant quantize bnb ...`."""

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python quantize/bnb.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from litquant.errors import run_job  # noqa: E402
from litquant.jobs.quantize import bnb as main  # noqa: E402

if __name__ == "__main__":
    run_job(main)
