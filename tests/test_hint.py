"""HINT: exact parameter count, HMHA/QKCU switches, the per-forward cache, batch independence, reference mode."""
from __future__ import annotations

import pytest
import torch

from conftest import build_from_yaml_file
from models import build_model
from models.attention.csa import ChannelSelfAttention
from models.attention.hmha import (
    CACHE_KEY,
    HeadModulation,
    HierarchicalMultiHeadAttention,
    InterLayerModulation,
    IntraLayerModulation,
    channel_order,
)

SMALL = {"name": "hint", "dim": 8, "num_blocks": [1, 1, 1, 2], "num_refinement_blocks": 1}
QKCU_TYPES = (IntraLayerModulation, InterLayerModulation, HeadModulation)


def attentions(model: torch.nn.Module) -> list[HierarchicalMultiHeadAttention]:
    return [m for m in model.modules() if isinstance(m, HierarchicalMultiHeadAttention)]


def test_default_param_count_and_layout():
    model = build_model({"name": "hint"})
    assert sum(p.numel() for p in model.parameters()) == 24_873_812
    layers = attentions(model)
    assert len(layers) == 26
    assert {a.head_widths[0] * 8 for a in layers} == {96, 192, 384}
    assert all(a.head_widths == [a.head_widths[0] * r for r in (1, 2, 2, 3)] for a in layers)
    assert not any(isinstance(m, HierarchicalMultiHeadAttention) for m in model.encoder_level1.modules())


def test_no_qkcu_parameters_when_off():
    model = build_model({**SMALL, "hmha": {"subspace_ratios": [1, 1, 1, 1]}, "qkcu": {"intra": False, "inter": False}})
    assert not any(isinstance(m, QKCU_TYPES + (torch.nn.Conv1d,)) for m in model.modules())
    for attention in attentions(model):
        width = attention.project_out.in_channels
        assert sum(p.numel() for p in attention.parameters()) == sum(
            p.numel() for p in ChannelSelfAttention(width, 4, False).parameters()
        )


def test_uniform_without_rerank_is_plain_channel_attention():
    torch.manual_seed(0)
    hmha = HierarchicalMultiHeadAttention(16, 4, False, subspace_ratios=[1, 1, 1, 1], rerank=False, intra=False, inter=False)
    with torch.no_grad():
        hmha.temperature.uniform_(0.5, 2.0)
    csa = ChannelSelfAttention(16, 4, False)
    csa.load_state_dict(hmha.state_dict())
    x = torch.randn(2, 16, 9, 11)
    torch.testing.assert_close(hmha(x), csa(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("group", "options", "check"),
    [
        ("hmha", {"subspace_ratios": [1, 1, 3, 3]}, lambda a: a.head_widths == [a.head_widths[0] * r for r in (1, 1, 3, 3)]),
        ("hmha", {"rerank": False, "rank_scope": "sample"}, lambda a: not a.rerank and a.per_sample),
        ("qkcu", {"intra": False}, lambda a: a.intra is None and a.inter is not None),
        ("qkcu", {"inter": False}, lambda a: a.inter is None and a.intra is not None),
        ("hmha", {"compat": "reference"}, lambda a: a.reference and a.inter.reference),
    ],
)
def test_options_reachable_from_yaml(tmp_path, group, options, check):
    config = {**SMALL, group: options}
    from_yaml = build_from_yaml_file(tmp_path, config, seed=1)
    assert all(check(a) for a in attentions(from_yaml))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({**SMALL, "hmha": {"subspace_ratios": [1, 1, 3]}}, r"latent blocks: .*split width 64 into 12.8, 12.8, 38.4 channels.*multiple of 5"),
        ({**SMALL, "hmha": {"subspace_ratios": [0, 2]}}, "positive integers"),
        ({**SMALL, "hmha": {"ratios": [1, 1]}}, r"unknown hmha option\(s\) ratios; valid hmha options: subspace_ratios"),
        ({**SMALL, "qkcu": {"cross": True}}, "valid qkcu options: intra .*, inter"),
        ({**SMALL, "hmha": {"rank_scope": "global"}}, "rank_scope must be one of batch, sample"),
        ({**SMALL, "qkcu": True}, "'qkcu' must be a mapping"),
        ({**SMALL, "hmha": {"compat": "authors"}}, "hmha.compat must be one of corrected, reference, got 'authors'"),
        ({**SMALL, "hmha": {"compat": "reference", "rank_scope": "sample"}}, "compat: reference ranks and caches batch means"),
    ],
)
def test_bad_options_fail_clearly(config, message):
    with pytest.raises(ValueError, match=message):
        build_model(config)


def test_sample_scope_is_batch_independent_and_batch_scope_is_not():
    x = torch.rand(3, 3, 16, 16)
    for scope, independent in (("sample", True), ("batch", False)):
        torch.manual_seed(2)
        model = build_model({**SMALL, "hmha": {"rank_scope": scope}}).eval()
        with torch.no_grad():
            together, alone = model(x)[1:2], model(x[1:2])
        assert torch.allclose(together, alone, atol=1e-5) == independent, scope


def test_cache_is_fresh_per_forward_carried_and_resized():
    torch.manual_seed(3)
    model = build_model(SMALL).eval()
    seen = []

    def record(module, args):
        cache = args[1].get(CACHE_KEY)
        seen.append(None if cache is None else tuple(cache.shape))

    for attention in attentions(model):
        attention.inter.register_forward_pre_hook(record)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        first = model(x)
        model(torch.rand(2, 3, 16, 16))
        again = model(x)
    # Per call: latent (64) x2, decoder3 (32), decoder2 (16), decoder1 (16), refinement (16).
    per_call = [None, (1, 64, 64), (1, 64, 64), (1, 32, 32), (1, 16, 16), (1, 16, 16)]
    assert seen == per_call * 3
    assert torch.equal(first, again)


def test_cache_update_uses_true_division():
    inter = InterLayerModulation([2, 4, 4, 6], per_sample=False)
    maps = [torch.full((3, c, c), 1.0 / c) for c in inter.head_widths]
    # Every head's map averages 1/c_i; weighted by c_i / C the update is heads / C everywhere.
    torch.testing.assert_close(inter.cache_update(maps), torch.full((1, 16, 16), 4 / 16))
    context = {}
    inter(maps, context)
    assert context[CACHE_KEY].shape == (1, 16, 16) and context[CACHE_KEY].abs().sum() > 0


def test_state_dict_is_the_whole_state():
    x = torch.rand(1, 3, 16, 16)
    torch.manual_seed(4)
    source = build_model(SMALL).eval()
    torch.manual_seed(5)
    target = build_model(SMALL).eval()
    with torch.no_grad():
        expected = source(x)
        target.load_state_dict(source.state_dict())
        assert torch.equal(target(x), expected)


def test_odd_sizes_gradients_determinism_batches():
    torch.manual_seed(6)
    model = build_model(SMALL)
    x = torch.rand(3, 3, 17, 13)
    model(x[:2]).square().mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reaches {name}"
    model.eval()
    with torch.no_grad():
        for batch in (1, 3):
            out = model(x[:batch])
            assert out.shape == (batch, 3, 17, 13)
            assert torch.equal(out, model(x[:batch]))


def test_reference_mode_carries_the_cache_across_calls():
    x, y = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    outputs = {}
    for compat in ("corrected", "reference"):
        torch.manual_seed(7)
        model = build_model({**SMALL, "hmha": {"compat": compat}}).eval()
        with torch.no_grad():
            fresh = model(x)
            model(y)
            outputs[compat] = fresh, model(x)
            if compat == "reference":
                model.reset_cache()
                assert torch.equal(model(x), fresh)
                assert set(model.state_dict()) == set(build_model(SMALL).state_dict())
    corrected, reference = outputs["corrected"], outputs["reference"]
    assert torch.equal(*corrected)  # stateless: the second call on x ignores the call on y
    assert not torch.allclose(*reference, atol=1e-4)  # the cache from the calls before changes x's output
    assert not torch.allclose(corrected[0], reference[0], atol=1e-4)  # first block and floor division


def test_reference_mode_keeps_the_parameter_count():
    with torch.device("meta"):
        model = build_model({"name": "hint", "hmha": {"compat": "reference"}})
    assert sum(p.numel() for p in model.parameters()) == 24_873_812


def test_reference_cache_update_floors_and_first_block_does_not_modulate():
    widths = [2, 4, 4, 6]
    values = [0.5, 4.5, -0.5, 3.0]
    maps = [torch.full((3, c, c), v) for c, v in zip(widths, values)]
    reference = InterLayerModulation(widths, per_sample=False, reference=True)
    # floor(v_i * c_i / 16): floor(1/16) + floor(18/16) + floor(-2/16) + floor(18/16) = 0 + 1 - 1 + 1
    torch.testing.assert_close(reference.cache_update(maps), torch.ones(1, 16, 16))
    corrected = InterLayerModulation(widths, per_sample=False)
    torch.testing.assert_close(corrected.cache_update(maps), torch.full((1, 16, 16), 35 / 16))
    context = {}
    assert all(out is attn for out, attn in zip(reference(maps, context), maps))
    torch.testing.assert_close(context[CACHE_KEY], torch.full((1, 16, 16), 0.9))
    assert not torch.equal(reference(maps, context)[0], maps[0])  # with a cache it modulates
    assert not torch.equal(corrected(maps, {})[0], maps[0])  # corrected modulates with a zero cache


def test_reference_ranking_matches_corrected_ranking_on_batch_means():
    q = torch.randn(3, 16, 40, generator=torch.Generator().manual_seed(8))
    assert torch.equal(channel_order(q, per_sample=False, reference=True), channel_order(q, per_sample=False))
