"""Train one experiment (or a Hydra multirun of several) and write its run folder.

    python scripts/train.py                                            # classification, tiny, embedded data
    python scripts/train.py experiment=classification/resnet50_carafe
    python scripts/train.py -m downsampler=carafe downsampler.compressed_channels=4,8,16,32,64   # Table XII grid
    torchrun --nproc_per_node 8 scripts/train.py scale=paper data.root=/data/imagenet hydra.run.dir=runs/r50

Rerunning with the same ``hydra.run.dir`` resumes from its last checkpoint. What a failure leaves in the run folder:
``tasks.common.train_job``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from tasks.common.experiment import hold_named_run_folder
from tasks.common.run_folder import RunFolderLocked
from tasks.common.train_job import check_shared_run_dir, run_job


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    run_job(cfg, Path(hydra_cfg.runtime.output_dir), hydra_cfg.job.name)


if __name__ == "__main__":
    check_shared_run_dir(sys.argv[1:])
    try:
        with hold_named_run_folder(sys.argv[1:]):  # before Hydra writes .hydra/ into the folder
            main()
    except RunFolderLocked as error:
        sys.exit(f"error: {error}")
