"""LAformer and RELA: linear cost in pixels, the rank enhancement, switches, model contract."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import build_from_yaml_file
from models import build_model
from models.profile import activation_bytes
from models.attention.rela import FEATURE_MAPS, RankEnhancedLinearAttention

SMALL = {"name": "laformer", "dim": 8, "num_blocks": [1, 1, 1, 2], "num_refinement_blocks": 1, "heads": [1, 1, 2, 2]}


def flops(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(x)
    return counter.get_total_flops()


def pixel_softmax_attention(x: torch.Tensor) -> torch.Tensor:
    """Quadratic reference: softmax attention over pixels, to show the meters see N x N costs."""
    tokens = x.flatten(2)
    return (tokens.transpose(-2, -1) @ tokens).softmax(dim=-1) @ tokens.transpose(-2, -1)


@pytest.mark.parametrize("rank_enhance", [True, False])
def test_rela_memory_and_time_grow_linearly_in_pixels(rank_enhance):
    rela = RankEnhancedLinearAttention(16, 2, False, rank_enhance=rank_enhance)
    small, large = torch.randn(1, 16, 32, 32), torch.randn(1, 16, 64, 64)
    assert activation_bytes(rela, large) < 6 * activation_bytes(rela, small)
    assert flops(rela, large) < 4.5 * flops(rela, small)
    assert activation_bytes(pixel_softmax_attention, large) > 6 * activation_bytes(pixel_softmax_attention, small)
    assert flops(pixel_softmax_attention, large) > 6 * flops(pixel_softmax_attention, small)


def test_rank_enhance_off_has_no_depthwise_conv():
    with_conv = RankEnhancedLinearAttention(16, 2, False, kernel_size=5)
    without = RankEnhancedLinearAttention(16, 2, False, rank_enhance=False)
    assert without.rank_conv is None
    assert not any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 for m in without.modules())
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(with_conv) - count(without) == 16 * 5 * 5
    model = build_model({**SMALL, "rela": {"rank_enhance": False}})
    assert all(m.rank_conv is None for m in model.modules() if isinstance(m, RankEnhancedLinearAttention))


def test_rela_raises_the_rank_of_the_attention_map():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 8, 8)  # 64 pixels, heads of d = 4 channels
    on = RankEnhancedLinearAttention(8, 2, False)
    off = RankEnhancedLinearAttention(8, 2, False, rank_enhance=False)
    off.load_state_dict({k: v for k, v in on.state_dict().items() if not k.startswith("rank_conv")})
    rank_on, rank_off = on.attention_rank(x), off.attention_rank(x)
    assert rank_on.shape == rank_off.shape == (2, 8)
    assert rank_off.max() <= 4
    assert rank_on.min() > rank_off.max()


@pytest.mark.parametrize("rank_enhance", [True, False])
def test_effective_maps_reproduce_the_forward(rank_enhance):
    torch.manual_seed(1)
    rela = RankEnhancedLinearAttention(8, 2, False, rank_enhance=rank_enhance)
    x = torch.randn(2, 8, 5, 7)
    v = rela.qkv(x).chunk(3, dim=1)[2].flatten(2)
    mixed = (rela.effective_attention_maps(x) @ v[..., None])[..., 0]
    torch.testing.assert_close(rela.project_out(mixed.reshape(x.shape)), rela(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("feature_map", sorted(FEATURE_MAPS))
def test_feature_maps(feature_map):
    rela = RankEnhancedLinearAttention(8, 2, False, feature_map=feature_map)
    out = rela(torch.randn(1, 8, 6, 6))
    assert out.shape == (1, 8, 6, 6) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({**SMALL, "rela": {"feature_map": "softmax"}}, "feature_map must be one of relu, elu1, softplus"),
        ({**SMALL, "rela": {"kernel_size": 4}}, "odd number"),
        ({**SMALL, "rela": {"kernel": 3}}, r"unknown rela option\(s\) kernel; valid rela options: feature_map"),
    ],
)
def test_bad_options_fail_clearly(config, message):
    with pytest.raises(ValueError, match=message):
        build_model(config)


def test_options_reachable_from_yaml(tmp_path):
    config = {**SMALL, "channel_reduction": 2, "rela": {"feature_map": "elu1", "kernel_size": 5}}
    layers = [m for m in build_from_yaml_file(tmp_path, config, seed=2).modules() if isinstance(m, RankEnhancedLinearAttention)]
    assert layers and all(m.rank_conv.kernel_size == (5, 5) and m.feature_map is FEATURE_MAPS["elu1"] for m in layers)


def test_no_softmax_in_the_model():
    model = build_model(SMALL)
    with torch.no_grad(), torch.autograd.profiler.profile() as prof:
        model(torch.rand(1, 3, 16, 16))
    assert not any("softmax" in event.name for event in prof.function_events)


def test_odd_sizes_gradients_determinism_batches():
    torch.manual_seed(3)
    model = build_model(SMALL)
    x = torch.rand(3, 3, 17, 13)
    model(x[:2]).square().mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reaches {name}"
    model.eval()
    with torch.no_grad():
        outputs = {batch: model(x[:batch]) for batch in (1, 3)}
        for batch, out in outputs.items():
            assert out.shape == (batch, 3, 17, 13)
            assert torch.equal(out, model(x[:batch]))
        torch.testing.assert_close(outputs[3][:1], outputs[1], atol=1e-5, rtol=1e-4)
