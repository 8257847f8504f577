"""Chat with a model: `python generate/chat.py` == `litquant chat`."""

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python generate/chat.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from litquant.errors import run_job  # noqa: E402
from litquant.jobs.chat import main  # noqa: E402

if __name__ == "__main__":
    run_job(main)
