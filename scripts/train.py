"""Train one experiment (or a Hydra multirun of several) and write its run folder.

    python scripts/train.py                                            # classification, tiny, embedded data
    python scripts/train.py experiment=classification/resnet50_carafe
    python scripts/train.py -m downsampler=carafe downsampler.compressed_channels=4,8,16,32,64   # Table XII grid
    torchrun --nproc_per_node 8 scripts/train.py scale=paper data.root=/data/imagenet hydra.run.dir=runs/r50

Rerunning with the same ``hydra.run.dir`` resumes from its last checkpoint.
"""

from __future__ import annotations

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from tasks.common.experiment import ConfigError, hold_named_run_folder, run_experiment
from tasks.common.io import RunFolderLocked


def _check_shared_run_dir() -> None:
    # Every torchrun rank composes its own config; a time-stamped default folder could differ between ranks.
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not any(a.startswith("hydra.run.dir=") for a in sys.argv):
        sys.exit("under torchrun pass hydra.run.dir=<folder> so that every process writes to the same run folder")


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run_experiment(cfg, HydraConfig.get().runtime.output_dir)
    except ConfigError as error:
        sys.exit(f"config error: {error}")


if __name__ == "__main__":
    _check_shared_run_dir()
    try:
        with hold_named_run_folder(sys.argv[1:]):  # before Hydra writes .hydra/ into the folder
            main()
    except RunFolderLocked as error:
        sys.exit(f"error: {error}")
