"""Task packages: detection, segmentation, inpainting, classification, and what they share (common)."""
