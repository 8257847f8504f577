"""LoRA / QLoRA finetuning: `python finetune/lora.py ...` == `litquant finetune lora ...`.

The job is `litquant.jobs.finetune.lora`; the trainer is the `litquant.training` package.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python finetune/lora.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from litquant.errors import run_job  # noqa: E402
from litquant.jobs.finetune import lora  # noqa: E402

if __name__ == "__main__":
    run_job(lora)
