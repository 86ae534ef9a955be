"""Cost accounting: analytic FLOPs per input pixel equal a count of the aten operations each module runs, the
convolution part equals torch.utils.flop_counter's, and CARAFE's equal the paper's formula. (Table 2's printed
figures, declared in conf/table/2.yaml, are checked against these costs in tests/test_results.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from carafe import DOWNSAMPLERS, UPSAMPLERS, build_downsampler, build_upsampler, reassembly_flops, use_backend
from carafe.costs import carafe_paper_flops, count_flops, flops_per_pixel, num_params, paper_round

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = [
    ("upsampler", name, {}) for name in UPSAMPLERS.names] + [
    ("downsampler", name, {}) for name in DOWNSAMPLERS.names] + [
    ("upsampler", "carafe", {"compressed_channels": None}),
    ("upsampler", "carafe", {"up_group": 2, "encoder_kernel": 5, "up_kernel": 3, "normalizer": "sigmoid_normalized"}),
    ("upsampler", "deconv", {"kernel_size": 2}),
    ("upsampler", "deconv", {"bias": False}),
    ("upsampler", "gum", {"hidden_channels": 4, "num_hidden_layers": 1}),
    ("upsampler", "spatial_attention", {"mode": "nearest", "kernel_size": 1}),
    ("downsampler", "carafe", {"compressed_channels": None, "down_group": 2, "down_kernel": 3}),
    ("downsampler", "lip", {"variant": "bottleneck"}),
    ("downsampler", "dpp", {"kernel_size": 5, "asymmetric": True, "learn_filter": True}),
    ("downsampler", "strided_conv", {"bias": False}),
]


@pytest.mark.parametrize("kind,name,options", VARIANTS,
                         ids=[f"{k[:4]}-{n}-{'-'.join(map(str, o.values())) or 'default'}" for k, n, o in VARIANTS])
@pytest.mark.parametrize("scale", [2, 3])
def test_analytic_flops_equal_counted(kind: str, name: str, options: dict, scale: int) -> None:
    build = build_upsampler if kind == "upsampler" else build_downsampler
    torch.manual_seed(0)
    module = build(name, 8, scale, **options)
    # Per-input-pixel formulas assume H, W divisible by sigma for downsamplers.
    h, w = (4 * scale, 2 * scale) if kind == "downsampler" else (5, 3)
    x = torch.randn(2, 8, h, w)
    counted = count_flops(module, x)
    with FlopCounterMode(display=False) as torch_counter, torch.no_grad():
        module(x)
    assert counted.total == flops_per_pixel(module) * x.shape[0] * h * w, counted.by_op
    # torch's counter: 2 FLOPs per multiply-add of every conv, bias left out -- the same convolution term as ours --
    # plus the registered reassembly op's formula, which both counters use.
    reassembly = sum(v for op, v in counted.by_op.items() if op.startswith("carafe."))
    assert counted.conv_macs2 + reassembly == torch_counter.get_total_flops()


@pytest.mark.parametrize("up", [True, False])
def test_reassembly_term_matches_reassembly_flops(up: bool) -> None:
    torch.manual_seed(0)
    module = build_upsampler("carafe", 8, 2) if up else build_downsampler("carafe", 8, 2)
    x = torch.randn(1, 8, 6, 4)
    with use_backend("reference"):  # the reference's own mul / add run inside the op, unseen by the counter
        counted = count_flops(module, x)
    op = "carafe.carafe.default" if up else "carafe.carafe_down.default"
    assert counted.by_op[op] == reassembly_flops(x.shape, 5, 2, up=up)


def test_carafe_exact_and_paper_formula() -> None:
    module = build_upsampler("carafe", 256, 2)
    assert flops_per_pixel(module) == 199_496 == carafe_paper_flops(256, 2, 64, 3, 5)
    assert num_params(module) == 74_148
    for cm in (16, 32, 128, 256):
        for k_enc, k_up in ((1, 3), (3, 5), (5, 7), (7, 7)):
            with torch.device("meta"):
                m = build_upsampler("carafe", 256, 2, compressed_channels=cm, encoder_kernel=k_enc, up_kernel=k_up)
            assert flops_per_pixel(m) == carafe_paper_flops(256, 2, cm, k_enc, k_up)


def test_exact_values_of_the_other_rows() -> None:
    expected = {"nearest": (0, 0), "bilinear": (8_192, 0), "nearest_conv": (4_720_640, 590_080),
                "bilinear_conv": (4_728_832, 590_080), "deconv": (1_181_696, 590_080),
                "pixel_shuffle": (4_720_640, 2_360_320), "gum": (1_064_984, 132_098),
                "spatial_attention": (27_656, 2_305)}
    for name, (flops, params) in expected.items():
        with torch.device("meta"):
            module = build_upsampler(name, 256, 2)
        assert (flops_per_pixel(module), num_params(module)) == (flops, params), name


def test_paper_round() -> None:
    assert paper_round(199_496) == "199k" and paper_round(2_305) == "2.3k" and paper_round(4_720_640) == "4.7M"
    assert paper_round(0) == "0" and paper_round(8_192, like="8k") == "8k"
    assert paper_round(1_181_696, like="1.2M") == "1.2M" and paper_round(0, like="0") == "0"


def test_script_json_and_options() -> None:
    def run(*args: str):
        out = subprocess.run([sys.executable, str(ROOT / "scripts" / "op_costs.py"), *args], capture_output=True,
                             text=True, check=True, cwd=ROOT)
        return json.loads(out.stdout)

    rows = run("--json")
    ups = {r["name"]: r for r in rows if r["direction"] == "up"}
    assert set(ups) == set(UPSAMPLERS.names)
    assert ups["carafe"]["flops_per_pixel"] == 199_496 and ups["carafe"]["params"] == 74_148
    assert set(rows[0]) >= {"name", "flops_per_pixel", "params"}
    changed = run("--json", "--channels", "128", "--scale", "4", "--set", "carafe.compressed_channels=32",
                  "--set", "down.lip.variant=bottleneck", "--grids")
    carafe = next(r for r in changed["ops"] if r["name"] == "carafe" and r["direction"] == "up")
    assert carafe["flops_per_pixel"] == carafe_paper_flops(128, 4, 32, 3, 5)
    # the grids are the rows of conf/table/8.yaml, 9.yaml and 10.yaml, costed at the asked C and sigma
    assert [r["compressed_channels"] for r in changed["table8"]] == [16, 32, 64, 128, 256, None]
    assert [(r["encoder_kernel"], r["up_kernel"]) for r in changed["table9"]] == [
        (1, 3), (1, 5), (3, 3), (3, 5), (3, 7), (5, 5), (5, 7), (7, 7)]
    assert [r["normalizer"] for r in changed["table10"]] == ["sigmoid", "sigmoid_normalized", "softmax"]
    for r in changed["table8"][:-1] + changed["table9"]:
        assert r["flops_per_pixel"] == carafe_paper_flops(128, 4, r["compressed_channels"], r["encoder_kernel"],
                                                          r["up_kernel"])
    assert [r["paper_ap"] for r in changed["table10"]] == [37.4, 37.8, 37.8]  # ICCV 2019 Table 10
