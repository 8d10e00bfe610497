"""The restoration tasks restorch knows, each with the protocol its published numbers use.

A task fixes what a model sees and produces (channels), what it is trained with (loss), how its
results are measured (`metrics.Protocol`: colour space, border crop, noise level, SSIM definition) and which dataset
layout it expects by default (a key of `workloads.data.LAYOUTS`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from workloads.metrics import Protocol

DEFAULT_SIGMA = 25.0  # Gaussian denoising: the middle of the standard 15/25/50


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    in_channels: int
    out_channels: int
    loss: str  # "l1" (mean absolute error) or "mrae" (spectral reconstruction)
    protocol: Protocol
    layout: str  # default dataset layout, a key of workloads.data.LAYOUTS

    @property
    def noise_sigma(self) -> float | None:
        """Noise level (0..255 scale) added to clean images on the fly; None for paired tasks."""
        return self.protocol.noise_sigma


TASKS: dict[str, Task] = {
    task.name: task
    for task in [
        Task("deraining", "rain streak removal (Rain13K; Rain100H/L, Test100/1200/2800)",
             3, 3, "l1", Protocol("y"), "restormer"),
        Task("gaussian_denoising", "additive Gaussian noise removal (CBSD68, Kodak24, McMaster, Urban100)",
             3, 3, "l1", Protocol("rgb", noise_sigma=DEFAULT_SIGMA), "clean"),
        Task("real_denoising", "camera noise removal (SIDD, DND)",
             3, 3, "l1", Protocol("rgb"), "restormer"),
        # GoPro's and HIDE's numbers come from MATLAB's ssim (workloads/benchmarks.py); RealBlur's entries align first
        Task("motion_deblurring", "motion blur removal (GoPro, HIDE; RealBlur-J/R)",
             3, 3, "l1", Protocol("rgb", ssim_definition="matlab"), "restormer"),
        Task("low_light", "low-light enhancement (LOL-v1, LOL-v2)",
             3, 3, "l1", Protocol("rgb"), "lol_v2"),
        Task("dehazing", "haze removal (SOTS indoor/outdoor)",
             3, 3, "l1", Protocol("rgb"), "sots"),
        Task("desnowing", "snow removal (Snow100K S/M/L)",
             3, 3, "l1", Protocol("rgb"), "restormer"),
        Task("spectral_reconstruction", "31-band hyperspectral cube from RGB (NTIRE 2022 ARAD_1K)",
             3, 31, "mrae", Protocol("spectral"), "arad"),
    ]
}


def get_task(name: str, *, sigma: float | None = None) -> Task:
    """The task called `name`; `sigma` sets the noise level of gaussian_denoising (0..255 scale)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    task = TASKS[name]
    if sigma is None:
        return task
    if task.noise_sigma is None:
        raise ValueError(f"task {name!r} takes no noise sigma (only gaussian_denoising does)")
    if sigma < 0:
        raise ValueError(f"noise sigma must be >= 0, got {sigma}")
    return dataclasses.replace(task, protocol=dataclasses.replace(task.protocol, noise_sigma=float(sigma)))
