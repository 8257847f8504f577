"""The metric loggers of a run (`--logger`): TensorBoard and/or CSV under out_dir/logs."""

from __future__ import annotations

from pathlib import Path

LOGGERS = ("tensorboard", "csv", "both")


def make_loggers(out_dir: Path, which: str) -> list:
    from lightning.fabric.loggers import CSVLogger, TensorBoardLogger

    root = Path(out_dir) / "logs"
    loggers = []
    if which in ("tensorboard", "both"):
        loggers.append(TensorBoardLogger(root_dir=root, name="tensorboard"))
    if which in ("csv", "both"):
        loggers.append(CSVLogger(root_dir=root, name="csv", flush_logs_every_n_steps=10))
    return loggers
