"""Job functions: the entry points `litquant <job>` runs (see litquant/cli.py)."""
