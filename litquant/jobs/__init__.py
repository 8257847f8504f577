"""Job entry points: functions whose signatures and docstrings are the `litquant` CLI (see litquant/cli.py)."""
