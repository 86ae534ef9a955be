"""Whole networks built with the CARAFE operators under torch.compile(fullgraph=True): one graph, no break, and the
same forward and backward as eager. The classifier compiles whole; of a detector, the ResNet-FPN backbone does (the
torchvision detection heads branch on data: proposals, sampled RoIs), which is where the operators sit.

The graphs run with the aot_eager backend: it traces through dynamo and AOTAutograd (where a graph break or a
missing fake / autograd registration shows) without code generation, which would take minutes on a small CPU.
"""

from __future__ import annotations

import torch

from tasks.classification.model import build_classifier
from tasks.detection.model import build_backbone


def assert_compiled_matches_eager(model: torch.nn.Module, x: torch.Tensor) -> None:
    torch._dynamo.reset()
    params = [p for p in model.parameters() if p.requires_grad]

    def outputs_and_grads(fn):  # noqa: ANN001, ANN202
        out = fn(x)
        outs = list(out.values()) if isinstance(out, dict) else [out]
        grads = torch.autograd.grad(sum(o.square().mean() for o in outs), [x, *params])
        return [o.detach() for o in outs], grads

    eager_outs, eager_grads = outputs_and_grads(model)
    compiled_outs, compiled_grads = outputs_and_grads(torch.compile(model, fullgraph=True, backend="aot_eager"))
    for a, b in zip(compiled_outs, eager_outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_classifier_with_carafe_downsampling_compiles_as_one_graph():
    torch.manual_seed(0)
    model = build_classifier(depth=50, num_classes=10, downsampler="carafe").eval()
    assert_compiled_matches_eager(model, torch.randn(1, 3, 32, 32, requires_grad=True))


def test_detector_backbone_with_carafe_in_the_fpn_compiles_as_one_graph():
    torch.manual_seed(0)
    backbone = build_backbone(depth=50, fpn_upsampler="carafe").eval()
    assert_compiled_matches_eager(backbone, torch.randn(1, 3, 64, 64, requires_grad=True))
