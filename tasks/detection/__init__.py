"""Object detection and instance segmentation (COCO): Faster / Mask R-CNN with the papers operators."""
