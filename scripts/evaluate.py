"""Evaluate a trained run on its validation set (or another config's), without training.

    python scripts/evaluate.py +checkpoint=runs/classification/<hash>/checkpoint.pt
    python scripts/evaluate.py +checkpoint=ckpt.pt experiment=classification/resnet50_carafe scale=paper \
        data.root=/data/imagenet
    torchrun --nproc_per_node 8 scripts/evaluate.py +checkpoint=... hydra.run.dir=eval/r50

The config must describe the checkpoint's model (the run folder's ``config.yaml`` records it). Writes ``eval.json``
(metrics, checkpoint, device) into the Hydra run folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from tasks.common.data import build_loader
from tasks.common.distributed import close_world, init_world
from tasks.common.engine import evaluate, load_weights, prepared_datasets
from tasks.common.experiment import ConfigError, config_hash, settings_from, task_class, validate
from tasks.common.io import write_json_atomic
from tasks.common.provenance import device_name, git_commit, utc_now


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    checkpoint = cfg.get("checkpoint")
    if not checkpoint:
        sys.exit("name the weights to evaluate: +checkpoint=path/to/checkpoint.pt")
    try:
        validate(cfg)
    except ConfigError as error:
        sys.exit(f"config error: {error}")
    world = init_world(cfg.run.device)
    try:
        task = task_class(cfg)(cfg, world)
        model = load_weights(task.build_model(), checkpoint).to(world.device)
        _, val_set = prepared_datasets(task, world)
        batch = max(cfg.schedule.batch_size // world.world_size, 1)
        loader = build_loader(val_set, world, batch, False, cfg.run.num_workers, cfg.run.seed, task.collate_fn())
        metrics = evaluate(task, model, loader, settings_from(cfg))
        if world.is_main:
            out = Path(HydraConfig.get().runtime.output_dir) / "eval.json"
            write_json_atomic(out, {"metrics": metrics, "checkpoint": str(Path(checkpoint).resolve()),
                                    "config_hash": config_hash(cfg), "device": device_name(world.device),
                                    "world_size": world.world_size, "commit": git_commit(), "date": utc_now(),
                                    "dataset": task.dataset_description()})
            print(", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
            print(f"wrote {out}", file=sys.stderr)
    finally:
        close_world()


if __name__ == "__main__":
    main()
