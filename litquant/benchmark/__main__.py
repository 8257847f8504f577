"""`python -m litquant.benchmark --_worker SPEC_FILE RESULT_FILE`: one mode, measured in this process (what
`measure.measure_in_subprocess` starts); any other arguments run the `litquant benchmark` job."""

import sys

if len(sys.argv) == 4 and sys.argv[1] == "--_worker":
    from litquant.benchmark.measure import worker

    worker(sys.argv[2], sys.argv[3])
else:
    from litquant.errors import run_job
    from litquant.jobs.benchmark import main

    run_job(main)
