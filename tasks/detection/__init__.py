"""Detection and instance segmentation on COCO: Faster / Mask R-CNN ResNet-FPN (torchvision) with the papers'
swappable operators (FPN upsampler, mask-head upsampler, backbone downsamplers), COCO data and evaluation.

    from tasks.detection import build_detector, CocoDetection, collate_detection, coco_evaluate
"""

from tasks.detection.data import CocoDetection, category_to_label, coco_paths, collate_detection, load_coco
from tasks.detection.evaluation import InferenceSpeed, coco_evaluate, detections_to_coco, measure_inference_speed
from tasks.detection.model import MaskPredictor, ResNetFPNBackbone, build_backbone, build_detector
from tasks.detection.synthetic import ensure_synthetic_coco

__all__ = [
    "CocoDetection",
    "InferenceSpeed",
    "MaskPredictor",
    "ResNetFPNBackbone",
    "build_backbone",
    "build_detector",
    "category_to_label",
    "coco_evaluate",
    "coco_paths",
    "collate_detection",
    "detections_to_coco",
    "ensure_synthetic_coco",
    "load_coco",
    "measure_inference_speed",
]
