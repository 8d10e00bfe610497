"""RealBlur's alignment of a restored image to its ground truth, done before PSNR/SSIM.

RealBlur's blurred and sharp images come from two cameras of a beam-splitter rig; the pairs are
registered, but a deblurred result can still be off by a small shift or warp, so the official
evaluation (Rim et al., ECCV 2020; github.com/rimchang/RealBlur evaluation_RealBlur_ecc.py, based on
Koehler et al.'s evaluation code, with skimage 0.17.2 and OpenCV 4.2.0; Restormer's
Motion_Deblurring/evaluate_realblur.py does the same on its PNG results) measures after:
1. intensity matching: the result z (float32 RGB in [0, 1]) scaled by <x, z> / <z, z>, x the ground truth;
2. an ECC homography (`cv2.findTransformECC`, MOTION_HOMOGRAPHY from the identity) from the scaled
   result's grey image to the ground truth's (`cv2.COLOR_RGB2GRAY`), 100 iterations, epsilon 0,
   no input mask, Gaussian pre-filter of size 5;
3. the scaled result warped onto the ground truth (`cv2.warpPerspective`, WARP_INVERSE_MAP, bicubic,
   reflected borders), and a mask of the pixels the warp covers (the same warp of ones, nearest
   neighbour, zero outside); result and ground truth are both multiplied by the mask.
The metrics over the mask are in `workloads.metrics.realblur_metrics`.
"""
from __future__ import annotations

import numpy as np

ECC_ITERATIONS = 100
ECC_EPSILON = 0.0
ECC_GAUSSIAN_SIZE = 5


def align_to_target(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(aligned pred, target, mask), all HxWx3 float32 and masked, of two HxWx3 float32 RGB images in [0, 1]."""
    import cv2

    pred, target = np.asarray(pred, dtype=np.float32), np.asarray(target, dtype=np.float32)
    energy = np.sum(pred * pred)
    if energy == 0:
        raise ValueError("the result is black everywhere: RealBlur's intensity matching (scaling by <x,z>/<z,z>) "
                         "is undefined; check that the results were written correctly")
    scaled = (np.sum(target * pred) / energy) * pred
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, ECC_ITERATIONS, ECC_EPSILON)
    try:
        _, warp = cv2.findTransformECC(cv2.cvtColor(target, cv2.COLOR_RGB2GRAY), cv2.cvtColor(scaled, cv2.COLOR_RGB2GRAY),
                                       np.eye(3, dtype=np.float32), cv2.MOTION_HOMOGRAPHY, criteria, None, ECC_GAUSSIAN_SIZE)
    except cv2.error as err:
        raise ValueError(f"RealBlur's ECC alignment found no warp from the result to its target ({err.err}): the images "
                         "may be unrelated (results paired with the wrong targets?)") from None
    size = (target.shape[1], target.shape[0])
    aligned = cv2.warpPerspective(scaled, warp, size, flags=cv2.INTER_CUBIC + cv2.WARP_INVERSE_MAP,
                                  borderMode=cv2.BORDER_REFLECT)
    mask = cv2.warpPerspective(np.ones_like(scaled), warp, size, flags=cv2.INTER_NEAREST + cv2.WARP_INVERSE_MAP,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return aligned * mask, target * mask, mask
