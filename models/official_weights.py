"""The authors' released checkpoints in restorch's modules: a documented key map per architecture.

`load_official(arch, checkpoint, model_config)` builds restorch's model and fills every tensor from
the authors' checkpoint by the map below. Every tensor of the checkpoint must be used exactly once,
with the shape the config implies; otherwise a `CheckpointMismatch` names every unknown, missing and
mis-shaped key. Checked against the authors' code (random weights, their model and restorch's
after the import agree to float32 rounding, max |diff| <= 6e-7; HINT in reference mode over three
calls in a row). Sources (read for names and shapes; facts only, no code carried over):

restormer  github.com/swz30/Restormer  basicsr/models/archs/restormer_arch.py; the release is
           `{"params": state_dict}` (Deraining/test.py etc. load `checkpoint["params"]`).
           494 tensors by default (406 with LayerNorm_type BiasFree).
hint       github.com/joshyZhou/HINT  basicsr/models/archs/HINT_arch.py; `{"params": state_dict}`
           (Deraining/test_rain100L.py). 948 tensors by default. Their published numbers need
           `hmha: {compat: reference}` (the default model config here; see models/hint.py).
mst_plus_plus  github.com/caiyuanhao1998/MST-plus-plus
           test_challenge_code/architecture/MST_Plus_Plus.py; `{"state_dict": ...}` whose keys may
           carry a `module.` prefix (their architecture/__init__.py strips it). 227 tensors by
           default; restorch holds 197 (q, k and v fused).

Restormer (restorch name -> the authors' name; every other name is the same in both):
    patch_embed.weight                 patch_embed.proj.weight
    <block>.norm{1,2}.{weight,bias}    <block>.norm{1,2}.body.{weight,bias}
    <block>.attn.qkv.0.*               <block>.attn.qkv.*          (1x1 conv C -> 3C)
    <block>.attn.qkv.1.*               <block>.attn.qkv_dwconv.*   (3x3 depthwise on 3C)
HINT: Restormer's map, and
    encoder_level{1,2,3}.<i>.norm.*    encoder_level{1,2,3}.<i>.norm2.body.*  (attention-free blocks)
    <block>.attn.intra.gate.*          <block>.attn.intra_modulator.gatingConv.*
    <block>.attn.intra.{down,up}.*     <block>.attn.intra_modulator.{down,up}.*
    <block>.attn.inter.heads.<h>.scale_shift.*  <block>.attn.inter_modulator<h+1>.conv_width.*
    <block>.attn.inter.heads.<h>.gate.*         <block>.attn.inter_modulator<h+1>.gatingConv.*
    (the authors' latent stage has num_blocks[1] blocks: their [4, 6, 6, 8] is restorch's [4, 6, 6, 6])
MST++ (S = stage, L = level, J = block):
    body.S.encoder.L.J.<x>             body.S.encoder_layers.L.0.blocks.J.<x'>
    body.S.bottleneck.J.<x>            body.S.bottleneck.blocks.J.<x'>
    body.S.decoder.L.J.<x>             body.S.decoder_layers.L.2.blocks.J.<x'>
    body.S.downsample.L.*              body.S.encoder_layers.L.1.*
    body.S.upsample.L.*, fuse.L.*      body.S.decoder_layers.L.0.*, decoder_layers.L.1.*
  and inside a block (<x> -> <x'>):
    attn.to_qkv.weight (3C, C, 1, 1)   0.to_q.weight, 0.to_k.weight, 0.to_v.weight: three nn.Linear
                                       (C, C) weights, concatenated in that order along dim 0 (a 1x1
                                       conv over a channels-first map is the same map as their Linear
                                       over channels-last pixels)
    attn.project_out.weight (C, C, 1, 1)  0.proj.weight (C, C), nn.Linear;  .bias is 0.proj.bias
    attn.temperature                   0.rescale
    attn.pos_emb.*                     0.pos_emb.*
    norm.*, ffn.net.*                  1.norm.*, 1.fn.net.*  (their PreNorm(LayerNorm, FeedForward))
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.registry import build_model, load_model_config

Rename = tuple[str, str | Callable[[re.Match[str]], str]]
MAX_LISTED = 12


def _head_module(part: str) -> Callable[[re.Match[str]], str]:
    """heads.<h> -> inter_modulator<h+1>.<part>: the authors number their per-head modulators from 1."""
    return lambda match: f".attn.inter_modulator{int(match[1]) + 1}.{part}."


_RESTORMER: tuple[Rename, ...] = (
    (r"^patch_embed\.weight$", r"patch_embed.proj.weight"),
    (r"\.norm([12])\.(weight|bias)$", r".norm\1.body.\2"),
    (r"\.attn\.qkv\.0\.", r".attn.qkv."),
    (r"\.attn\.qkv\.1\.", r".attn.qkv_dwconv."),
)
_HINT: tuple[Rename, ...] = (
    (r"^(encoder_level\d\.\d+)\.norm\.(weight|bias)$", r"\1.norm2.body.\2"),
    *_RESTORMER,
    (r"\.attn\.intra\.gate\.", r".attn.intra_modulator.gatingConv."),
    (r"\.attn\.intra\.(down|up)\.", r".attn.intra_modulator.\1."),
    (r"\.attn\.inter\.heads\.(\d+)\.scale_shift\.", _head_module("conv_width")),
    (r"\.attn\.inter\.heads\.(\d+)\.gate\.", _head_module("gatingConv")),
)
_MST_PLUS_PLUS: tuple[Rename, ...] = (
    (r"^(body\.\d+)\.encoder\.(\d+)\.(\d+)\.", r"\1.encoder_layers.\2.0.blocks.\3.<block>"),
    (r"^(body\.\d+)\.bottleneck\.(\d+)\.", r"\1.bottleneck.blocks.\2.<block>"),
    (r"^(body\.\d+)\.decoder\.(\d+)\.(\d+)\.", r"\1.decoder_layers.\2.2.blocks.\3.<block>"),
    (r"^(body\.\d+)\.downsample\.(\d+)\.", r"\1.encoder_layers.\2.1."),
    (r"^(body\.\d+)\.upsample\.(\d+)\.", r"\1.decoder_layers.\2.0."),
    (r"^(body\.\d+)\.fuse\.(\d+)\.", r"\1.decoder_layers.\2.1."),
    (r"<block>attn\.temperature$", r"0.rescale"),
    (r"<block>attn\.(to_qkv|project_out|pos_emb)\.", lambda m: f"0.{'proj' if m[1] == 'project_out' else m[1]}."),
    (r"<block>norm\.", r"1.norm."),
    (r"<block>ffn\.", r"1.fn."),
)


@dataclass(frozen=True)
class OfficialFormat:
    renames: tuple[Rename, ...]  # applied in order to restorch's name; the result is the authors' name
    release_key: str  # the entry of the released file that holds the state dict
    # The authors' name suffix that restorch holds as one tensor -> the authors' suffixes, concatenated
    # in this order along dim 0.
    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()
    linear: str = r"$^"  # the authors' nn.Linear weights (out, in), restorch's 1x1 convs (out, in, 1, 1)
    config: Mapping[str, Any] = field(default_factory=dict)  # restorch options of the authors' release


FORMATS: dict[str, OfficialFormat] = {
    "restormer": OfficialFormat(_RESTORMER, "params"),
    "hint": OfficialFormat(_HINT, "params", config={"hmha": {"compat": "reference"}}),
    "mst_plus_plus": OfficialFormat(
        _MST_PLUS_PLUS,
        "state_dict",
        fused=((".to_qkv.weight", (".to_q.weight", ".to_k.weight", ".to_v.weight")),),
        linear=r"\.(to_[qkv]|proj)\.weight$",
    ),
}


@dataclass(frozen=True)
class Source:
    """The authors' tensors that make one restorch tensor (concatenated along dim 0), each of `shape`."""

    names: tuple[str, ...]
    shape: tuple[int, ...]


class CheckpointMismatch(ValueError):
    """The checkpoint's tensors do not fit the model: names every unknown, missing and mis-shaped key."""


def official_format(arch: str) -> OfficialFormat:
    if arch not in FORMATS:
        raise ValueError(f"no key map for the authors' {arch!r} checkpoints; known: {', '.join(FORMATS)}")
    return FORMATS[arch]


def official_sources(arch: str, model: nn.Module) -> dict[str, Source]:
    """restorch's tensor name -> where the authors' checkpoint holds it, for this model's sizes."""
    spec = official_format(arch)
    sources: dict[str, Source] = {}
    for name, tensor in model.state_dict().items():
        official = name
        for pattern, replacement in spec.renames:
            official = re.sub(pattern, replacement, official)
        names = (official,)
        for suffix, parts in spec.fused:
            if official.endswith(suffix):
                names = tuple(official.removesuffix(suffix) + part for part in parts)
        shape = tuple(tensor.shape)
        if re.search(spec.linear, names[0]):
            shape = (shape[0] // len(names), shape[1])
        sources[name] = Source(names, shape)
    used = [official for source in sources.values() for official in source.names]
    if len(used) != len(set(used)) or any("<" in official for official in used):
        raise RuntimeError(f"the {arch} key map gives a name twice or leaves one unmapped: {sorted(used)}")
    return sources


def model_config_for(arch: str, model_config: Mapping[str, Any] | str | Path | None) -> dict[str, Any]:
    """The restorch config to load into: the given one (its name must be arch) or the authors' release."""
    config = {"name": arch, **official_format(arch).config} if model_config is None else load_model_config(model_config)
    config.setdefault("name", arch)
    if config["name"] != arch:
        raise ValueError(f"model config builds {config['name']!r} but the checkpoint is the authors' {arch!r}")
    return config


def official_shapes(arch: str, model_config: Mapping[str, Any] | str | Path | None = None) -> dict[str, tuple[int, ...]]:
    """The authors' tensor names and shapes for this config (built on the meta device: no memory, no time)."""
    with torch.device("meta"):
        model = build_model(model_config_for(arch, model_config))
    return {name: source.shape for source in official_sources(arch, model).values() for name in source.names}


def official_state_dict(arch: str, checkpoint: Mapping[str, Any] | str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a released file or object: its release entry, without a `module.` prefix."""
    if isinstance(checkpoint, (str, Path)):
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"a checkpoint must be a mapping (a state dict), got {type(checkpoint).__name__}")
    key = official_format(arch).release_key
    state = checkpoint.get(key, checkpoint)
    not_tensors = [name for name, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(
            f"the checkpoint holds no state dict: expected {{{key!r}: state_dict}} (the authors' {arch} release) "
            f"or a state dict; entries that are not tensors: {', '.join(map(str, not_tensors[:MAX_LISTED]))}"
        )
    if state and all(name.startswith("module.") for name in state):
        state = {name.removeprefix("module."): value for name, value in state.items()}
    return dict(state)


def _listed(names: list[str]) -> str:
    more = f", ... ({len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


def check_official(arch: str, state: Mapping[str, torch.Tensor], sources: Mapping[str, Source], config: Mapping[str, Any]) -> None:
    """Raise CheckpointMismatch unless every tensor of `state` is used exactly once, with its shape."""
    expected = {name: source.shape for source in sources.values() for name in source.names}
    unknown = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    misshaped = sorted(
        f"{name} {tuple(state[name].shape)} (expected {shape})"
        for name, shape in expected.items()
        if name in state and tuple(state[name].shape) != shape
    )
    problems = [
        f"{len(found)} {what}: {_listed(found)}"
        for what, found in (
            ("unknown key(s), not in the authors' layout for this config", unknown),
            ("missing key(s)", missing),
            ("mis-shaped key(s)", misshaped),
        )
        if found
    ]
    if problems:
        raise CheckpointMismatch(
            f"the checkpoint does not fit the authors' {arch} with restorch config {dict(config)}: "
            + "; ".join(problems)
            + ". Is it a checkpoint of this architecture, and does the config (dim, num_blocks, bias, "
            "layernorm_type, ...) match the one it was trained with?"
        )


def load_official(
    arch: str,
    checkpoint: Mapping[str, Any] | str | Path,
    model_config: Mapping[str, Any] | str | Path | None = None,
) -> nn.Module:
    """restorch's `arch` model holding the authors' released weights (a file or a loaded object).

    model_config: restorch's config of the model (a dict or YAML path); None for the authors'
    release (for HINT that includes `hmha.compat: reference`, which their numbers need).
    """
    config = model_config_for(arch, model_config)
    state = official_state_dict(arch, checkpoint)
    model = build_model(config)
    sources = official_sources(arch, model)
    check_official(arch, state, sources, config)
    target = model.state_dict()
    model.load_state_dict(
        {name: torch.cat([state[part] for part in source.names]).reshape(target[name].shape) for name, source in sources.items()}
    )
    return model
