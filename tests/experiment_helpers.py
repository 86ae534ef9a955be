"""Shared by the experiment tests: overrides that shrink any classification run to seconds."""

from pathlib import Path


def smoke_overrides(data_dir: Path, epochs: int = 1, iters: int = 1) -> list[str]:
    """A run of ``epochs`` x ``iters`` batches of 8 on a 16-class, 4-per-class embedded dataset in ``data_dir``."""
    return [f"schedule.epochs={epochs}", "schedule.batch_size=8", "schedule.milestones=[]",
            f"run.max_iters_per_epoch={iters}", "run.max_eval_batches=1", "run.num_workers=0",
            "run.progress=false", "data.embedded.train_per_class=4", "data.embedded.val_per_class=2",
            f"data.embedded.dir={data_dir}"]
