"""Shared by the experiment tests: overrides that shrink any classification, detection, segmentation or inpainting
run to seconds."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def smoke_overrides(data_dir: Path, epochs: int = 1, iters: int = 1) -> list[str]:
    """A run of ``epochs`` x ``iters`` batches of 8 on a 16-class, 4-per-class embedded dataset in ``data_dir``."""
    return [f"schedule.epochs={epochs}", "schedule.batch_size=8", "schedule.milestones=[]",
            f"run.max_iters_per_epoch={iters}", "run.max_eval_batches=1", "run.num_workers=0",
            "run.progress=false", "data.embedded.train_per_class=4", "data.embedded.val_per_class=2",
            f"data.embedded.dir={data_dir}"]


def detection_smoke(data_dir: Path, iters: int = 1, num_val: int = 4) -> list[str]:
    """A detection run of ``iters`` batches of 2 on a 64-pixel embedded COCO-format dataset in ``data_dir``."""
    return ["task=detection", "schedule.epochs=1", "schedule.batch_size=2", f"run.max_iters_per_epoch={iters}",
            "run.num_workers=0", "run.progress=false", "data.embedded.num_train=4",
            f"data.embedded.num_val={num_val}", "data.embedded.image_size=64", f"data.embedded.dir={data_dir}",
            "model.min_size=64", "model.max_size=64"]


def segmentation_smoke(data_dir: Path, iters: int = 1, num_val: int = 2) -> list[str]:
    """A segmentation run of ``iters`` batches of 2 on a 64-pixel embedded ADE20k-layout dataset in ``data_dir``
    (decoder and head widths 32). Not smaller: at 32 px C5 is 1 x 1 and BatchNorm over two values per channel makes
    the first step's gradients explode (1e7 at conv1), so the evaluation after it is NaN."""
    return ["task=segmentation", "schedule.epochs=1", "schedule.batch_size=2", f"run.max_iters_per_epoch={iters}",
            "run.num_workers=0", "run.progress=false", "data.embedded.num_train=2",
            f"data.embedded.num_val={num_val}", "data.embedded.image_size=64", f"data.embedded.dir={data_dir}",
            "data.train_scales=[64]", "data.test_size=64", "data.max_size=64", "model.fpn_dim=32",
            "model.head_dim=32"]


def inpainting_smoke(data_dir: Path, epochs: int = 1, iters: int = 1) -> list[str]:
    """``epochs`` x ``iters`` GAN steps of batch 2 on 32 px crops of the embedded Places365-layout dataset in
    ``data_dir``, an 8-wide generator and a two-layer discriminator."""
    return ["task=inpainting", f"schedule.epochs={epochs}", "schedule.batch_size=2",
            f"run.max_iters_per_epoch={iters}", "run.max_eval_batches=1", "run.num_workers=0", "run.progress=false",
            "data.image_size=32", "data.embedded.num_train=4", "data.embedded.num_val=2",
            f"data.embedded.dir={data_dir}", "model.base_channels=8", "model.discriminator_channels=[8,16]"]
