"""The authors' checkpoints: the key map reproduces their layout, imports match a direct load, bad files fail clearly."""
from __future__ import annotations

import hashlib
import re

import pytest
import torch

from models import build_model
from models.official_weights import CheckpointMismatch, load_official, official_shapes

SMALL = {
    "restormer": {"name": "restormer", "dim": 8, "num_blocks": [1, 1, 1, 1], "num_refinement_blocks": 1, "heads": [1, 1, 1, 1]},
    "hint": {"name": "hint", "dim": 8, "num_blocks": [1, 2, 1, 2], "num_refinement_blocks": 1, "hmha": {"compat": "reference"}},
    "mst_plus_plus": {"name": "mst_plus_plus", "num_stages": 1},
}


def layout_digest(shapes: dict[str, tuple[int, ...]]) -> str:
    return hashlib.sha256("\n".join(f"{name}:{shape}" for name, shape in sorted(shapes.items())).encode()).hexdigest()[:16]


# Count and digest of (name, shape) of the state_dict of the authors' models at their defaults,
# measured with their code: Restormer (swz30/Restormer basicsr/models/archs/restormer_arch.py),
# HINT (joshyZhou/HINT basicsr/models/archs/HINT_arch.py), MST++ (caiyuanhao1998/MST-plus-plus
# test_challenge_code/architecture/MST_Plus_Plus.py).
@pytest.mark.parametrize(
    ("arch", "config", "count", "digest", "sample"),
    [
        ("restormer", None, 494, "925ac7f4a29e941c", ("latent.7.attn.qkv_dwconv.weight", (1152, 1, 3, 3))),
        ("restormer", {"layernorm_type": "BiasFree"}, 406, "e2f0fa8f329d02a4", ("refinement.3.norm2.body.weight", (96,))),
        ("hint", None, 948, "f38c5d15f24f4324", ("latent.5.attn.inter_modulator4.conv_width.weight", (288, 144, 1))),
        ("mst_plus_plus", None, 227, "053d26a644d6ee3e", ("body.2.decoder_layers.1.2.blocks.0.0.to_v.weight", (31, 31))),
    ],
)
def test_key_map_gives_the_authors_layout(arch, config, count, digest, sample):
    shapes = official_shapes(arch, config)
    name, shape = sample
    assert shapes[name] == shape
    assert (len(shapes), layout_digest(shapes)) == (count, digest)


def authors_to_restorch(arch: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse map, written out independently of models/official_weights.py."""
    if arch == "mst_plus_plus":
        return mst_to_restorch(state)
    renamed = {}
    for name, tensor in state.items():
        if arch == "hint" and name.startswith("encoder_level"):
            name = name.replace(".norm2.body.", ".norm.")
        for old, new in (
            ("patch_embed.proj.", "patch_embed."), (".body.weight", ".weight"), (".body.bias", ".bias"),
            (".attn.qkv.", ".attn.qkv.0."), (".attn.qkv_dwconv.", ".attn.qkv.1."),
            (".intra_modulator.gatingConv.", ".intra.gate."), (".intra_modulator.", ".intra."),
        ):
            name = name.replace(old, new)
        head = re.search(r"\.inter_modulator(\d)\.(conv_width|gatingConv)\.", name)
        if head:
            part = {"conv_width": "scale_shift", "gatingConv": "gate"}[head[2]]
            name = name.replace(head[0], f".inter.heads.{int(head[1]) - 1}.{part}.")
        renamed[name] = tensor
    return renamed


def mst_to_restorch(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {}
    for name, tensor in state.items():
        for pattern, replacement in (
            (r"encoder_layers\.(\d)\.0\.blocks\.(\d)\.", r"encoder.\1.\2."),
            (r"encoder_layers\.(\d)\.1\.", r"downsample.\1."),
            (r"bottleneck\.blocks\.", "bottleneck."),
            (r"decoder_layers\.(\d)\.0\.", r"upsample.\1."),
            (r"decoder_layers\.(\d)\.1\.", r"fuse.\1."),
            (r"decoder_layers\.(\d)\.2\.blocks\.(\d)\.", r"decoder.\1.\2."),
            (r"\.0\.rescale$", ".attn.temperature"), (r"\.0\.proj\.", ".attn.project_out."),
            (r"\.0\.pos_emb\.", ".attn.pos_emb."), (r"\.1\.norm\.", ".norm."), (r"\.1\.fn\.net\.", ".ffn.net."),
        ):
            name = re.sub(pattern, replacement, name)
        if name.endswith(".attn.project_out.weight"):
            tensor = tensor[:, :, None, None]
        renamed[name] = tensor
    for q_name in [name for name in renamed if name.endswith(".0.to_q.weight")]:
        stem = q_name.removesuffix(".0.to_q.weight")
        parts = [renamed.pop(f"{stem}.0.to_{part}.weight") for part in "qkv"]
        renamed[f"{stem}.attn.to_qkv.weight"] = torch.cat(parts)[:, :, None, None]
    return renamed


def authors_checkpoint(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) * 0.1 for name, shape in official_shapes(arch, SMALL[arch]).items()}


@pytest.mark.parametrize("arch", sorted(SMALL))
def test_import_matches_direct_load(arch, tmp_path):
    state = authors_checkpoint(arch)
    release = {"params": state} if arch != "mst_plus_plus" else {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    path = tmp_path / "release.pth"
    torch.save(release, path)
    imported = load_official(arch, path, SMALL[arch]).eval()
    direct = build_model(SMALL[arch]).eval()
    direct.load_state_dict(authors_to_restorch(arch, state))
    x = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for _ in range(2):  # HINT's reference mode carries its cache into the second call
            torch.testing.assert_close(imported(x), direct(x), rtol=0, atol=0)


def test_defaults_are_the_authors_release():
    model = load_official("hint", {"params": authors_checkpoint("hint")}, SMALL["hint"])
    assert model.carries_cache
    with pytest.raises(ValueError, match="model config builds 'restormer' but the checkpoint is the authors' 'hint'"):
        load_official("hint", {}, SMALL["restormer"])
    with pytest.raises(ValueError, match="no key map for the authors' 'unet' checkpoints; known: restormer, hint"):
        official_shapes("unet")


def mismatch(arch: str, state: dict[str, torch.Tensor]) -> str:
    with pytest.raises(CheckpointMismatch) as error:
        load_official(arch, {"params": state}, SMALL[arch])
    return str(error.value)


def test_bad_keys_are_named():
    state = authors_checkpoint("restormer")
    renamed = dict(state)
    renamed["latent.0.attn.qkv_dw.weight"] = renamed.pop("latent.0.attn.qkv_dwconv.weight")
    message = mismatch("restormer", renamed)
    assert "1 unknown key(s), not in the authors' layout for this config: latent.0.attn.qkv_dw.weight" in message
    assert "1 missing key(s): latent.0.attn.qkv_dwconv.weight" in message

    missing = {name: tensor for name, tensor in state.items() if name != "output.weight"}
    assert "missing key(s): output.weight" in mismatch("restormer", missing)
    assert "unknown key(s), not in the authors' layout for this config: extra.weight" in mismatch(
        "restormer", {**state, "extra.weight": torch.zeros(1)}
    )
    misshaped = {**state, "encoder_level2.0.attn.temperature": torch.ones(2, 1, 1)}
    message = mismatch("restormer", misshaped)
    assert "1 mis-shaped key(s): encoder_level2.0.attn.temperature (2, 1, 1) (expected (1, 1, 1))" in message
    assert "unknown" not in message and "missing" not in message


def test_wrong_architecture_or_size_is_refused():
    message = mismatch("hint", authors_checkpoint("restormer"))
    assert "18 unknown key(s), not in the authors' layout for this config: encoder_level1.0.attn.project_out.weight" in message
    assert "181 missing key(s): decoder_level1.0.attn.inter_modulator1.conv_width.bias" in message
    assert "(169 more)" in message and "latent.0.attn.temperature (1, 1, 1) (expected (4, 1, 1))" in message
    with pytest.raises(CheckpointMismatch, match=r"90 mis-shaped key\(s\): decoder_level1.0.attn.project_out.weight \(16, 16, 1, 1\) \(expected \(32, 32, 1, 1\)\)"):
        load_official("restormer", {"params": authors_checkpoint("restormer")}, {**SMALL["restormer"], "dim": 16})


def test_not_a_state_dict(tmp_path):
    with pytest.raises(ValueError, match=r"expected \{'state_dict': state_dict\} \(the authors' mst_plus_plus release\).*: epoch"):
        load_official("mst_plus_plus", {"epoch": 3}, SMALL["mst_plus_plus"])
    with pytest.raises(FileNotFoundError, match="checkpoint .*absent.pth does not exist"):
        load_official("restormer", tmp_path / "absent.pth", SMALL["restormer"])
