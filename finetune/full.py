"""Full finetuning of a small model: `python finetune/full.py ...` == `litquant finetune full ...`.

The job is `litquant.jobs.finetune.full`; the trainer is the `litquant.training` package.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python finetune/full.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from litquant.errors import run_job  # noqa: E402
from litquant.jobs.finetune import full  # noqa: E402

if __name__ == "__main__":
    run_job(full)
