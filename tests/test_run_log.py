"""scripts/train.py's run log is complete: warnings, config errors, failures and interrupts reach train.log, and a
config error leaves no empty run folder behind. (metrics.json's ``carafe_backends``: tests/test_engine.py's DDP run.)

One child process runs the script several times (as ``__main__``, Hydra cleared between runs), with
``run_experiment`` replaced where a scenario needs a failure that a real run would take minutes to reach.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = """
import json, runpy, sys, warnings
from pathlib import Path
from hydra.core.global_hydra import GlobalHydra
sys.path.insert(0, {repo!r})
import tasks.common.train_job as train_job
real_run = train_job.run_experiment

def run(run_dir, *overrides, replace=None):
    GlobalHydra.instance().clear()
    train_job.run_experiment = replace or real_run  # what the script's job calls
    sys.argv = ["scripts/train.py", *overrides, f"hydra.run.dir={{run_dir}}"]
    try:
        runpy.run_path("scripts/train.py", run_name="__main__")
    except SystemExit as stop:
        return f"exit {{stop.code}}"
    except BaseException as error:
        return type(error).__name__
    return "ok"

def interrupted(cfg, run_dir):
    raise KeyboardInterrupt

def failed(cfg, run_dir):
    raise RuntimeError("boom")

def warns(cfg, run_dir):
    import torch, carafe  # the compiler is missing and CARAFE_CXXFLAGS rules out the prebuilt kernels
    carafe.carafe(torch.ones(1, 2, 3, 3), torch.ones(1, 9, 6, 6), 3, 1, 2)
    warnings.warn("a warning of the run's own", UserWarning)

root = Path({root!r})
(root / "resumed").mkdir()
(root / "resumed" / "config.yaml").write_text("{{}}")
print(json.dumps({{
    "fresh": run(root / "fresh", "schedule.lr=abc"),
    "resumed": run(root / "resumed", "schedule.lr=abc"),
    "interrupted": run(root / "interrupted", replace=interrupted),
    "failed": run(root / "failed", replace=failed),
    "warned": run(root / "warned", replace=warns),
}}))
"""


def test_train_log_holds_warnings_errors_and_interrupts(tmp_path):
    code = CHILD.format(repo=str(REPO), tests=str(REPO / "tests"), root=str(tmp_path))
    env = {"PATH": "/usr/bin:/bin", "CXX": "no-such-compiler-xyz", "CARAFE_CXXFLAGS": "-O0",
           "CARAFE_BUILD_DIR": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome == {"fresh": "exit config error: schedule.lr: Value 'abc' of type 'str' could not be converted to "
                                "Float", "resumed": outcome["resumed"], "interrupted": "KeyboardInterrupt",
                       "failed": "exit 1", "warned": "ok"}, outcome  # Hydra reports a failure, exit status 1
    # A config error in a new folder: nothing ran, so nothing is left (not even Hydra's files or an empty log).
    assert not (tmp_path / "fresh").exists()
    # In a folder that already holds a run, the error is kept in its log.
    assert outcome["resumed"].startswith("exit config error: schedule.lr")
    assert "[ERROR] - config error: schedule.lr" in (tmp_path / "resumed" / "train.log").read_text()
    log = (tmp_path / "interrupted" / "train.log").read_text()
    assert "interrupted (KeyboardInterrupt); rerun with hydra.run.dir=" in log and "Traceback" in log
    log = (tmp_path / "failed" / "train.log").read_text()
    assert "the run failed: RuntimeError: boom\nTraceback" in log and "in failed\nRuntimeError: boom" in log
    log = (tmp_path / "warned" / "train.log").read_text()
    assert "RuntimeWarning: CARAFE: the fast 'cpu' backend is unavailable" in log
    assert "UserWarning: a warning of the run's own" in log
