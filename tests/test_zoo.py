"""The operator zoo: every name builds by name, by mapping, by callable and by its Hydra config, runs forward and
backward on CPU with the documented output shape, and the custom-code operators pass float64 gradcheck."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from carafe import DOWNSAMPLERS, UPSAMPLERS, build_downsampler, build_upsampler
from carafe.costs import num_params
from carafe.downsamplers import DetailPreservingPool, LocalImportancePool
from carafe.upsamplers import GuidedUpsample, InterpolateUpsample, SpatialAttentionUpsample

CONF = Path(__file__).resolve().parents[1] / "conf"
BUILDERS = {"upsampler": (UPSAMPLERS, build_upsampler), "downsampler": (DOWNSAMPLERS, build_downsampler)}
ALL = [(kind, name) for kind, (registry, _) in BUILDERS.items() for name in registry.names]


def _expected_shape(kind: str, n: int, c: int, h: int, w: int, s: int) -> tuple[int, ...]:
    return (n, c, h * s, w * s) if kind == "upsampler" else (n, c, -(-h // s), -(-w // s))


@pytest.mark.parametrize("kind,name", ALL)
@pytest.mark.parametrize("scale", [2, 3])
def test_forward_backward_shapes(kind: str, name: str, scale: int) -> None:
    _, build = BUILDERS[kind]
    torch.manual_seed(0)
    module = build(name, 8, scale)
    x = torch.randn(2, 8, 5, 7, requires_grad=True)  # odd H, W: down ops give ceil(H / sigma)
    y = module(x)
    assert y.shape == _expected_shape(kind, 2, 8, 5, 7, scale)
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for p in module.parameters():
        assert p.grad is not None, f"{name}: a parameter got no gradient"


@pytest.mark.parametrize("kind,name", ALL)
def test_builds_by_name_mapping_and_callable(kind: str, name: str) -> None:
    registry, build = BUILDERS[kind]
    by_name = build(name, 16, 2)
    by_type = build({"type": name}, 16, 2)
    by_name_key = build({"name": name}, channels=16, scale_factor=2)
    cls, fixed = registry.entry(name)
    by_partial = build(functools.partial(cls, **fixed), 16, 2)
    for other in (by_type, by_name_key, by_partial):
        assert type(other) is type(by_name)
        assert other.extra_repr() == by_name.extra_repr()
        assert num_params(other) == num_params(by_name)


def test_options_reach_the_module() -> None:
    assert build_upsampler("carafe", 16, 2, up_kernel=3).kernel_size == 3
    assert build_upsampler({"type": "carafe", "up_kernel": 3}, 16, 2, up_kernel=7).kernel_size == 7
    assert build_downsampler("lip", 16, 2, variant="bottleneck").variant == "bottleneck"
    assert build_upsampler(InterpolateUpsample, 4, 2).mode == "nearest"


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_unknown_name_lists_the_known_ones(kind: str) -> None:
    registry, build = BUILDERS[kind]
    with pytest.raises(KeyError) as err:
        build("no_such_op", 8, 2)
    for name in registry.names:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="'type' or 'name'"):
        build({"kernel_size": 3}, 8, 2)
    with pytest.raises(TypeError):
        build(3, 8, 2)


@pytest.mark.parametrize("kind,name", ALL)
def test_hydra_config_builds_the_same_object(kind: str, name: str) -> None:
    hydra = pytest.importorskip("hydra")
    from hydra.utils import instantiate

    with hydra.initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = hydra.compose(overrides=[f"+{kind}={name}"])
    partial = instantiate(cfg[kind])
    _, build = BUILDERS[kind]
    from_config = partial(channels=16, scale_factor=2)
    through_factory = build(partial, 16, 2)
    by_name = build(name, 16, 2)
    for module in (from_config, through_factory):
        assert type(module) is type(by_name)
        assert module.extra_repr() == by_name.extra_repr()
        assert num_params(module) == num_params(by_name)


# Configs that are another setting of a zoo operator rather than an operator of their own: config -> zoo name.
VARIANTS = {"upsampler": {"deconv_mask": "deconv"}, "downsampler": {}}


def test_every_name_has_a_config_and_back() -> None:
    for kind, (registry, _) in BUILDERS.items():
        assert sorted(p.stem for p in (CONF / kind).glob("*.yaml")) == sorted([*registry.names, *VARIANTS[kind]])


@pytest.mark.parametrize("kind,variant", [(k, v) for k, names in VARIANTS.items() for v in names])
def test_a_variant_config_builds_its_operator_with_other_settings(kind: str, variant: str) -> None:
    hydra = pytest.importorskip("hydra")
    from hydra.utils import instantiate

    with hydra.initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = hydra.compose(overrides=[f"+{kind}={variant}"])
    _, build = BUILDERS[kind]
    module, by_name = instantiate(cfg[kind])(channels=16, scale_factor=2), build(VARIANTS[kind][variant], 16, 2)
    assert type(module) is type(by_name) and module.extra_repr() != by_name.extra_repr()


def test_gum_starts_as_bilinear_and_s_a_rescales() -> None:
    x = torch.randn(1, 4, 5, 6)
    assert torch.allclose(GuidedUpsample(4, 2)(x), F.interpolate(x, scale_factor=2, mode="bilinear"), atol=1e-6)
    sa = SpatialAttentionUpsample(4, 3)
    up = F.interpolate(x, scale_factor=3, mode="bilinear")
    assert torch.allclose(sa(x), up * torch.sigmoid(sa.attention(up)))


def test_dpp_and_lip_on_constant_maps_return_the_constant() -> None:
    x = torch.full((1, 3, 7, 5), 2.5)
    assert torch.allclose(DetailPreservingPool(3, 2)(x), torch.full((1, 3, 4, 3), 2.5))
    assert torch.allclose(LocalImportancePool(3, 2).eval()(x), torch.full((1, 3, 4, 3), 2.5))


def test_dpp_preserves_detail_better_than_average() -> None:
    x = torch.zeros(1, 1, 3, 3)
    x[0, 0, 1, 1] = 1.0  # one bright pixel: DPP weighs it above the smoothed local value
    dpp = DetailPreservingPool(1, 2, alpha=0.0, lambda_=2.0)
    assert dpp(x)[0, 0, 0, 0] > F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)[0, 0, 0, 0]


def _randomise(module: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return module.double()


@pytest.mark.parametrize("make", [
    lambda: GuidedUpsample(3, 2, hidden_channels=4),
    lambda: SpatialAttentionUpsample(3, 2),
    lambda: SpatialAttentionUpsample(3, 3, mode="nearest"),
    lambda: DetailPreservingPool(3, 2, learn_filter=True),
    lambda: DetailPreservingPool(3, 3, lambda_=1.5),
    lambda: LocalImportancePool(3, 2),
    lambda: LocalImportancePool(4, 2, variant="bottleneck", hidden_channels=2),
], ids=["gum", "sa", "sa-nearest-3x", "dpp-full", "dpp-3x", "lip", "lip-bottleneck"])
def test_gradcheck_custom_ops(make) -> None:  # noqa: ANN001
    module = _randomise(make())
    torch.manual_seed(2)
    x = torch.randn(1, module.channels, 5, 4, dtype=torch.float64, requires_grad=True)
    params = tuple(p for p in module.parameters())

    def fn(inp, *weights):  # noqa: ANN001, ANN202
        return torch.func.functional_call(module, {n: w for (n, _), w in zip(module.named_parameters(), weights)},
                                          (inp,))

    assert torch.autograd.gradcheck(fn, (x, *(p.detach().requires_grad_() for p in params)), eps=1e-6, atol=1e-5)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="interpolation"):
        build_upsampler("nearest_conv", 8, 2, mode="bicubic")
    with pytest.raises(ValueError, match="kernel_size"):
        build_upsampler("deconv", 8, 1, kernel_size=2)
    with pytest.raises(ValueError, match="odd"):
        build_downsampler("max_pool", 8, 2, kernel_size=2)
    with pytest.raises(ValueError, match="variant"):
        build_downsampler("lip", 8, 2, variant="full")
    with pytest.raises(TypeError, match="channels"):
        build_upsampler("gum", 8.0, 2)
