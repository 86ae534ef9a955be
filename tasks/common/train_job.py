"""What ``scripts/train.py`` does around ``run_experiment``: the run folder every torchrun rank must share, and
what a config error, an interrupt or a failure leaves in the run folder.

The run folder's ``train.log`` holds everything the run said: its log records, Python warnings (e.g. a fallback
to the slow reference backend), and why it stopped early (an exception with its traceback, or an interrupt). A
config error stops the run before any work; the folder Hydra made for it is removed again unless it already held
a run, whose ``train.log`` then records the error.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

from omegaconf import DictConfig

from tasks.common.experiment import ConfigError, run_experiment
from tasks.common.run_folder import LOCK_NAME

log = logging.getLogger("train")


def check_shared_run_dir(argv: list[str]) -> None:
    """Exit with a message when the command runs under torchrun (``WORLD_SIZE`` > 1) without naming its run folder:
    every rank composes its own config, and a time-stamped default folder could differ between ranks."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not any(a.startswith("hydra.run.dir=") for a in argv):
        sys.exit("under torchrun pass hydra.run.dir=<folder> so that every process writes to the same run folder")


def run_job(cfg: DictConfig, run_dir: Path, job_name: str) -> None:
    """``run_experiment(cfg, run_dir)`` as Hydra's job ``job_name``: a config error exits with its message (and
    removes the folder if nothing but Hydra used it), an interrupt or a failure is written to the log file before it
    propagates."""
    logging.captureWarnings(True)  # Python warnings go to the log (console and train.log), not only to stderr
    unused = _only_hydras_files(run_dir, job_name)
    try:
        run_experiment(cfg, run_dir)
    except ConfigError as error:
        if unused:
            _remove_unused_run_dir(run_dir, job_name)
        else:
            _to_log_file(logging.ERROR, f"config error: {error}")
        sys.exit(f"config error: {error}")
    except KeyboardInterrupt:
        _to_log_file(logging.ERROR, f"interrupted (KeyboardInterrupt); rerun with hydra.run.dir={run_dir} to resume "
                                    "from the last checkpoint", exc_info=True)
        raise
    except Exception as error:
        _to_log_file(logging.ERROR, f"the run failed: {type(error).__name__}: {error}", exc_info=True)
        raise


def _to_log_file(level: int, message: str, exc_info: bool = False) -> None:
    """A record for the run's log file only: what the terminal shows already (Hydra prints the traceback, Python
    the interrupt, sys.exit the config error) is not repeated there."""
    record = log.makeRecord(log.name, level, __file__, 0, message, None, sys.exc_info() if exc_info else None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _only_hydras_files(run_dir: Path, job_name: str) -> bool:
    """True if ``run_dir`` holds nothing but what Hydra writes before the job starts (its .hydra folder and the
    job's log file) and the folder's lock the script took before Hydra ran: no run has used the folder."""
    return all(entry.name in (".hydra", f"{job_name}.log", LOCK_NAME) for entry in run_dir.iterdir())


def _remove_unused_run_dir(run_dir: Path, job_name: str) -> None:
    logging.shutdown()  # closes the log file, so that it can be removed
    for name in (".hydra", f"{job_name}.log", LOCK_NAME):  # the lock's open handle keeps holding it until exit
        path = run_dir / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    try:
        run_dir.rmdir()
    except OSError:  # another rank's files, or a folder the user filled meanwhile: leave it
        pass
