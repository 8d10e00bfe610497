"""Foundation models: exact reference counts, attention contracts, registry behaviour."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml

from models import build_model, list_models
from models.attention import ATTENTIONS, build_attention
from models.attention.base import cosine_logits
from models.attention.glmha import ScaledInputPointwiseConv
from models.layers import channel_chunks
from models.profile import count_params, profile_model

GLMHA_LEVELS = [
    ["glmha", "csa", "csa", "csa"],
    ["glmha", "glmha", "csa", "csa"],
    ["glmha", "glmha", "glmha", "csa"],
    "glmha",
]


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_restormer_reference_counts():
    model = build_model({"name": "restormer"})
    assert n_params(model) == 26_126_644
    assert n_params(build_model({"name": "restormer", "layernorm_type": "BiasFree"})) == 26_111_668
    profile = profile_model(model, size=256)
    assert round(profile.conv_gmacs, 2) == 140.99
    assert round(profile.total_gmacs, 2) == 154.88
    assert sum(profile.params_per_level.values()) == 26_126_644
    assert set(profile.params_per_level) == {"level1", "level2", "level3", "latent", "other"}


def test_mst_plus_plus_reference_count():
    assert n_params(build_model({"name": "mst_plus_plus"})) == 1_619_625
    assert n_params(build_model({"name": "mst_plus_plus", "attention": "glmha"})) < 1_619_625


def test_glmha_restormer_below_paper_figures_and_monotone():
    profiles = {}
    for r in (0.25, 0.5, 0.75, 0.9):
        model = build_model({"name": "restormer", "attention": "glmha", "glmha": {"kv_reduction": r}})
        profiles[r] = profile_model(model, size=256)
    assert profiles[0.5].params < 25_780_000
    assert profiles[0.5].conv_gmacs < 134.53
    ordered = [profiles[r] for r in (0.25, 0.5, 0.75, 0.9)]
    assert all(a.params > b.params for a, b in zip(ordered, ordered[1:]))
    assert all(a.conv_gmacs > b.conv_gmacs for a, b in zip(ordered, ordered[1:]))


def test_glmha_counts_fall_with_levels_table9_order():
    csa = profile_model(build_model({"name": "restormer"}), size=256)
    by_levels = [profile_model(build_model({"name": "restormer", "attention": a}), size=256) for a in GLMHA_LEVELS]
    chain = [csa, *by_levels]
    assert all(a.params > b.params for a, b in zip(chain, chain[1:]))
    assert all(a.conv_gmacs > b.conv_gmacs for a, b in zip(chain, chain[1:]))


def test_glmha_rejects_reduction_leaving_no_channel():
    with pytest.raises(ValueError, match="kv_reduction"):
        build_attention("glmha", 8, 2, False, kv_reduction=0.95)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        build_attention("glmha", 8, 2, False, kv_reduction=1.0)


@pytest.mark.parametrize("name", sorted(ATTENTIONS))
def test_attention_contract(name: str):
    torch.manual_seed(0)
    attention = build_attention(name, 16, 2, False)
    for batch, height, width in [(1, 7, 9), (3, 5, 13)]:
        x = torch.randn(batch, 16, height, width)
        assert attention(x).shape == x.shape

    x = torch.randn(3, 16, 11, 7, requires_grad=True)
    attention.train()
    attention(x).square().mean().backward()
    for param_name, param in attention.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"{name}: no gradient reaches {param_name}"

    attention.eval()
    with torch.no_grad():
        assert torch.equal(attention(x), attention(x))


@pytest.mark.parametrize("name", sorted(ATTENTIONS))
def test_attention_same_in_both_memory_layouts(name: str):
    """The channels-last fast paths (strided head views, pixel-major products) compute what the
    channels-first layout does, values and gradients."""
    torch.manual_seed(0)
    attention = build_attention(name, 16, 2, False)
    x = torch.randn(3, 16, 6, 10)
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        attention.zero_grad()
        x_in = x.clone(memory_format=layout).requires_grad_()
        out = attention(x_in)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out, x_in.grad, [p.grad.clone() for p in attention.parameters()]))
    (out_a, grad_a, params_a), (out_b, grad_b, params_b) = results
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_a, grad_b, rtol=1e-5, atol=1e-6)
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fused_cosine_logits_match_normalised_product():
    """cosine_logits' hand-written backward = autograd through F.normalize (a zero row included)."""
    torch.manual_seed(0)
    q = torch.randn(2, 3, 4, 10, dtype=torch.float64)
    q[0, 1, 2] = 0  # a zero token: its norm is clamped and its gradient along q vanishes
    q.requires_grad_()
    k = torch.randn(2, 3, 5, 10, dtype=torch.float64, requires_grad=True)
    temperature = torch.rand(3, 1, 1, dtype=torch.float64, requires_grad=True)
    expected = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * temperature
    fused = cosine_logits(q, k, temperature)
    torch.testing.assert_close(fused, expected)
    upstream = torch.randn_like(expected)
    for a, b in zip(torch.autograd.grad(fused, (q, k, temperature), upstream),
                    torch.autograd.grad(expected, (q, k, temperature), upstream)):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(cosine_logits, (torch.randn(1, 2, 3, 7, dtype=torch.float64, requires_grad=True),
                                                    torch.randn(1, 2, 3, 7, dtype=torch.float64, requires_grad=True),
                                                    temperature[:2].detach().requires_grad_()))


def test_channel_chunks_keep_the_channels_last_layout_in_backward():
    x = torch.randn(2, 6, 4, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    parts = channel_chunks(x, 3)
    for part, reference in zip(parts, x.chunk(3, dim=1)):
        assert torch.equal(part, reference)
    sum(part.sum() * (i + 1) for i, part in enumerate(parts)).backward()
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x.grad, torch.arange(1.0, 4.0).repeat_interleave(2).view(1, 6, 1, 1).expand_as(x))


@pytest.mark.parametrize("bias", [False, True])
def test_glmha_scaled_pointwise_conv_is_conv_of_scaled_input(bias: bool):
    torch.manual_seed(0)
    conv = ScaledInputPointwiseConv(6, 4, bias)
    x = torch.randn(3, 6, 5, 7).contiguous(memory_format=torch.channels_last)
    scale = torch.rand(3, 6) + 0.5
    expected = F.conv2d(x * scale[:, :, None, None], conv.weight, conv.bias)
    torch.testing.assert_close(conv(x, scale), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(ATTENTIONS))
def test_attention_in_restormer_odd_sizes(name: str):
    torch.manual_seed(0)
    model = build_model({"name": "restormer", "dim": 8, "num_blocks": [1, 1, 1, 1], "num_refinement_blocks": 1,
                         "heads": [1, 1, 2, 2], "attention": name}).eval()
    with torch.no_grad():
        for batch in (1, 3):
            x = torch.rand(batch, 3, 19, 23)
            out = model(x)
            assert out.shape == x.shape
            assert torch.equal(out, model(x))


def test_restormer_grayscale_and_dual_pixel():
    small = {"dim": 8, "num_blocks": [1, 1, 1, 1], "num_refinement_blocks": 1, "heads": [1, 1, 1, 1]}
    gray = build_model({"name": "restormer", "inp_channels": 1, "out_channels": 1, **small})
    assert gray(torch.rand(1, 1, 16, 16)).shape == (1, 1, 16, 16)
    dual = build_model({"name": "restormer", "inp_channels": 6, "dual_pixel_task": True, **small})
    assert dual(torch.rand(2, 6, 12, 20)).shape == (2, 3, 12, 20)
    with pytest.raises(ValueError, match="inp_channels: 6"):
        build_model({"name": "restormer", "dual_pixel_task": True, **small})


def test_per_level_attention_choice():
    model = build_model({"name": "restormer", "attention": ["glmha", "csa", "linformer", "performer"]})
    kinds = {name.split(".")[0]: type(m).__name__ for name, m in model.named_modules() if name.endswith(".attn")}
    assert kinds["encoder_level1"] == kinds["decoder_level1"] == kinds["refinement"] == "GuidedLowRankAttention"
    assert kinds["encoder_level2"] == kinds["decoder_level2"] == "ChannelSelfAttention"
    assert kinds["encoder_level3"] == kinds["decoder_level3"] == "LinformerAttention"
    assert kinds["latent"] == "PerformerAttention"
    with pytest.raises(ValueError, match="list of 4"):
        build_model({"name": "restormer", "attention": ["glmha", "csa"]})


def test_yaml_config_builds_same_model(tmp_path):
    config = {"name": "restormer", "dim": 8, "num_blocks": [1, 1, 1, 1], "num_refinement_blocks": 1,
              "heads": [1, 1, 2, 2], "attention": ["glmha", "glmha", "csa", "csa"], "glmha": {"alpha": 0.5}}
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(config))
    torch.manual_seed(3)
    from_dict = build_model(config)
    torch.manual_seed(3)
    from_yaml = build_model(path)
    assert repr(from_dict) == repr(from_yaml)
    dict_state, yaml_state = from_dict.state_dict(), from_yaml.state_dict()
    assert dict_state.keys() == yaml_state.keys()
    assert all(torch.equal(dict_state[k], yaml_state[k]) for k in dict_state)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"name": "restormer9"}, "registered models: .*restormer"),
        ({"name": "restormer", "width": 8}, "unknown option.*'width'.*valid options: .*dim"),
        ({"name": "restormer", "attention": "flash"}, "unknown attention 'flash'; valid attentions: .*glmha"),
        ({"name": "restormer", "glmha": {"ratio": 0.5}}, "unknown option.*ratio.*'glmha'.*kv_reduction"),
        ({"dim": 8}, "needs a 'name'"),
    ],
)
def test_bad_configs_fail_clearly(config, message):
    with pytest.raises(ValueError, match=message):
        build_model(config)


def test_list_models_and_profile_is_deterministic():
    registered = list_models()
    assert {"restormer", "mst_plus_plus"} <= set(registered)
    assert registered["restormer"]["dim"] == 48 and registered["restormer"]["glmha"]["alpha"] == 0.6
    model = build_model({"name": "mst_plus_plus"})
    assert profile_model(model, 128) == profile_model(model, 128)
    assert count_params(model)[0] == 1_619_625


def test_cli_profile(capsys):
    from orchestrator.cli import main

    assert main(["models", "profile", "restormer", "--set", "attention=glmha", "--set", "glmha.kv_reduction=0.5", "--size", "64"]) == 0
    out = capsys.readouterr().out
    assert "restormer(attention=glmha" in out and "conv GMACs" in out
    assert main(["models", "profile", "restormer", "--set", "glmha.nope=1"]) == 2
    assert "unknown option(s) nope" in capsys.readouterr().err
