"""The standard test sets of each task: how their common release is laid out and how published
numbers are measured on them, each fact with the source it comes from.

An entry links to its task's metric protocol (`workloads.tasks.TASKS[task].protocol`) instead of
copying it, unless the benchmark's published numbers need one of their own (`metric_protocol`:
RealBlur's alignment before metrics); `metric_notes` says how the authors' evaluation script
measures and where it still differs from the protocol restorch applies (a server that keeps the
ground truth, float rather than uint8 images), so that a number computed by restorch is compared only
with numbers computed the same way. Facts that no
source read for this catalogue confirmed are listed in `unconfirmed`; a count that is not confirmed
(`count_confirmed=False`) is checked as a warning, not an error.

`check_benchmark` verifies a folder against an entry (image count, pairing, equal sizes within a
pair, the size of fixed-size sets) and computes the content digest of the files the benchmark reads
(`content_digest`), which a result records next to the benchmark and protocol names.

Sources (read for this catalogue; repository paths at the snapshot fetched on 2026-12-02):
- [R] Restormer, Zamir et al., CVPR 2022 (arXiv 2111.09881); github.com/swz30/Restormer:
  Deraining/evaluate_PSNR_SSIM.m, Deraining/Datasets/README.md, Motion_Deblurring/evaluate_gopro_hide.m,
  Motion_Deblurring/evaluate_realblur.py, Motion_Deblurring/Datasets/README.md, Denoising/evaluate_sidd.m,
  Denoising/test_real_denoising_{sidd,dnd}.py, Denoising/{test,evaluate}_gaussian_color_denoising.py,
  Denoising/Datasets/README.md, Denoising/README.md.
- [M] MPRNet, Zamir et al., CVPR 2021; github.com/swz30/MPRNet: Deraining/Datasets/README.md (same
  five deraining sets, same MATLAB script).
- [RB] RealBlur, Rim et al., ECCV 2020; github.com/rimchang/RealBlur: evaluation_RealBlur_ecc.py.
- [MST] MST++, Cai et al., CVPRW 2022 (NTIRE 2022 spectral reconstruction winner);
  github.com/caiyuanhao1998/MST-plus-plus: test_develop_code/test.py, test_develop_code/hsi_dataset.py,
  test_develop_code/utils.py, dataset/split_txt/valid_list.txt (50 names, ARAD_1K_0901..0950).
- [GLMHA] Ilyas et al., GLMHA (shared/seeds/001): NTIRE 2022 ARAD_1K has 1,000 RGB/HSI pairs, 950 train,
  50 validation, 50 test, 482x512, 31 bands 400-700 nm.
- [MW] MathWorks, "SSIM calculation for RGB images" (MATLAB Answers 2142916): MATLAB's `ssim(A, ref)` on
  an RGB array treats it as a 3-D volume ('SSS'); it differs from the mean of per-channel SSIMs. The
  Image Processing Toolbox's ssim.m (2013-2014 and 2013-2017 versions, public copies): uint8 converted
  to double, L 255, an 11x11x11 Gaussian of sigma 1.5 with 'replicate' padding, mean of the full map
  (restorch's `ssim_definition="matlab"`, workloads/metrics.py).
- [H] HINT's Desnowing test_snow100k.py and evaluate_Snow100k.py (copies found by content in the public
  code index; their repository was not identified): Snow100K test2000/Snow + test2000/Gt (.jpg), tiled
  inference (256 tiles, 128 overlap), PSNR/SSIM by Restormer's utils.calculate_psnr/calculate_ssim (RGB,
  per-channel SSIM, cv2 Gaussian 11x11 sigma 1.5, 'valid').
- [T] Third-party counts of the released files, not an authors' statement: a deraining evaluation README
  (Rain100H/L 100, Test100 98, Test1200 1200, Test2800 2800), a thesis table (same counts, SOTS outdoor
  500), a RESIDE dataset module (SOTS indoor 500, outdoor 500), the `restorers` LOL docs (LOL 485 train
  + 15 test pairs of 400x600), a GoPro loader that requires 11 test sequences / 1111 pairs, a LOL-v2
  Real comparison on "all 100 official test lows", the HVI-CIDNet README (LOL numbers reported with and
  without "GT mean", i.e. the output rescaled to the target's mean brightness).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from workloads.metrics import Protocol

REALBLUR_PROTOCOL = Protocol("rgb", alignment="realblur-ecc")
from workloads.tasks import get_task

DIGEST_VERSION = "content-v1"
SIDD_BLOCKS = (40, 32, 256, 256, 3)  # [R] evaluate_sidd.m loops i=1..40, k=1..32; blocks of 256x256 sRGB
SIDD_FILES = {"ValidationNoisyBlocksSrgb.mat": "ValidationNoisyBlocksSrgb", "ValidationGtBlocksSrgb.mat": "ValidationGtBlocksSrgb"}
DND_IMAGES, DND_BOXES = 50, 20  # [R] test_real_denoising_dnd.py: 50 images_srgb/NNNN.mat, 20 boxes each

_MATLAB_Y_SSIM = (
    "Y of MATLAB rgb2ycbcr on uint8, Wang's SSIM_index (Gaussian 11x11 sigma 1.5, 'valid'), "
    "PSNR 20 log10(255/RMSE), no border crop: the protocol as restorch defines it. The script pairs "
    "results with targets by sorted listing order, not by name [R Deraining/evaluate_PSNR_SSIM.m]"
)
_GT_MEAN = (
    "some low-light papers also report numbers 'with GT mean' (the output rescaled to the target's mean "
    "brightness before metrics) [T HVI-CIDNet README]; restorch does not rescale, so compare with the plain ones"
)
_MATLAB_RGB = (
    "MATLAB built-in psnr and ssim on RGB uint8; MATLAB's ssim treats an RGB array as one 3-D volume [MW], "
    "as the task's protocol (rgb-matlab-ssim) does"
)


@dataclass(frozen=True)
class Benchmark:
    name: str
    task: str  # a key of workloads.tasks.TASKS
    count: int  # images (pairs) in the set
    layout: str  # a key of workloads.data.LAYOUTS, "clean", or "sidd_blocks" / "dnd" (MATLAB files)
    release: str  # the folders and files of the common release
    sources: tuple[str, ...]
    size: tuple[int, int] | None = None  # HxW of every image, for fixed-size sets
    sigmas: tuple[float, ...] = ()  # Gaussian denoising: the noise levels papers report
    metric_notes: str = ""  # how the authors' script measures, where it differs from the protocol
    count_confirmed: bool = True
    unconfirmed: tuple[str, ...] = ()
    metric_protocol: Protocol | None = None  # the published numbers' own, where not the task's

    def protocol(self, sigma: float | None = None) -> Protocol:
        """The entry's protocol, else the task's (for Gaussian denoising at `sigma`, default the task's)."""
        protocol = get_task(self.task, sigma=sigma).protocol  # also rejects a sigma the task does not take
        return self.metric_protocol or protocol

    def describe(self) -> str:
        lines = [f"{self.name}: {self.task}, {self.count} image(s)"
                 + (f" of {self.size[0]}x{self.size[1]}" if self.size else "")
                 + (f", sigma {'/'.join(f'{s:g}' for s in self.sigmas)}" if self.sigmas else ""),
                 f"  layout: {self.release}",
                 f"  protocol {self.protocol().name}: {self.protocol().describe()}"]
        if self.metric_notes:
            lines.append(f"  published numbers: {self.metric_notes}")
        lines += [f"  not confirmed: {fact}" for fact in self.unconfirmed]
        lines.append(f"  sources: {'; '.join(self.sources)}")
        return "\n".join(lines)


def _deraining(name: str, count: int) -> Benchmark:
    return Benchmark(
        name, "deraining", count, "restormer",
        f"Datasets/test/{name}/input + target (Restormer's Rain13K test release) [R Deraining/Datasets/README.md]",
        ("[R] Deraining/evaluate_PSNR_SSIM.m, Deraining/test.py", "[M] Deraining/Datasets/README.md", f"[T] count {count}"),
        metric_notes=_MATLAB_Y_SSIM + "; papers report each set and the mean over the five",
        unconfirmed=("that input and target files share names in every set (the MATLAB script pairs by order; "
                     "this check pairs by name)",),
    )


def _gaussian(name: str, count: int, folder: str, *, count_in_name: bool = True) -> Benchmark:
    return Benchmark(
        name, "gaussian_denoising", count, "clean",
        f"Datasets/test/{folder}/ (clean .png/.tif only; noisy inputs are made at test time) [R Denoising/Datasets/README.md]",
        ("[R] Denoising/test_gaussian_color_denoising.py, Denoising/evaluate_gaussian_color_denoising.py",
         f"count {count}: " + ("the set's name" if count_in_name else "not confirmed")),
        sigmas=(15.0, 25.0, 50.0),
        metric_notes=(
            "PSNR only (the SSIM line is commented out), RGB, no crop; noise N(0, sigma/255) added to the float "
            "image unclipped, numpy legacy seed 0 reset before every image [R]. restorch seeds its own noise per "
            "image (workloads.data.PairedDataset), so its noise realisation differs from the authors'"
        ),
        count_confirmed=count_in_name,
        unconfirmed=() if count_in_name else (f"the count {count} (no source read states it)",),
    )


def _deblurring(name: str, count: int, folder: str, notes: str, sources: tuple[str, ...], *,
                count_confirmed: bool = False, protocol: Protocol | None = None) -> Benchmark:
    return Benchmark(
        name, "motion_deblurring", count, "restormer",
        f"Datasets/test/{folder}/input + target [R Motion_Deblurring/Datasets/README.md]",
        sources, metric_notes=notes, count_confirmed=count_confirmed,
        unconfirmed=() if count_confirmed else
        (f"the count {count} (as the Restormer paper's dataset section is usually quoted; not re-read)",),
        metric_protocol=protocol,
    )


_REALBLUR = (
    "each result is aligned to its target before metrics: intensity matching (scale by <x,z>/<z,z>), then an ECC "
    "homography (cv2.findTransformECC on grey images, 100 iterations, eps 0, gaussFiltSize 5), warped with cubic "
    "interpolation and a validity mask; PSNR over the masked pixels (float images, peak 1); SSIM from skimage "
    "(gaussian_weights, use_sample_covariance=False, data_range 1) averaged over the mask, 5 px border dropped "
    "[RB evaluation_RealBlur_ecc.py; R evaluate_realblur.py]: restorch's rgb-realblur-ecc protocol "
    "(workloads/alignment.py). The script pins skimage 0.17.2 and OpenCV 4.2.0; restorch runs the OpenCV it "
    "installs, whose ECC may converge to a slightly different warp"
)

BENCHMARKS: dict[str, Benchmark] = {
    entry.name: entry
    for entry in [
        _deraining("Rain100L", 100),
        _deraining("Rain100H", 100),
        _deraining("Test100", 98),
        _deraining("Test1200", 1200),
        _deraining("Test2800", 2800),
        Benchmark(
            "SIDD-val", "real_denoising", 40 * 32, "sidd_blocks",
            "Datasets/test/SIDD/ValidationNoisyBlocksSrgb.mat + ValidationGtBlocksSrgb.mat, uint8 arrays "
            "40x32x256x256x3 (MATLAB v5) [R Denoising/Datasets/README.md, test_real_denoising_sidd.py]",
            ("[R] Denoising/evaluate_sidd.m, Denoising/test_real_denoising_sidd.py",),
            size=(256, 256),
            metric_notes=("MATLAB psnr/ssim on single images in [0, 1], not quantised to uint8; MATLAB's ssim treats an "
                          "RGB array as one 3-D volume [MW] (restorch's rgb-matlab-ssim protocol, on uint8), so the "
                          "published SSIM is not comparable with the task's per-channel one"),
        ),
        Benchmark(
            "DND", "real_denoising", DND_IMAGES, "dnd",
            "Datasets/test/DND/info.mat + images_srgb/0001..0050.mat (MATLAB v7.3, variable InoisySRGB; "
            "20 bounding boxes per image in info.mat) [R Denoising/Datasets/README.md, test_real_denoising_dnd.py]",
            ("[R] Denoising/test_real_denoising_dnd.py, Denoising/README.md",),
            metric_notes=("the ground truth is withheld: PSNR/SSIM of the 1,000 boxes (50 images x 20) come from the "
                          "DND benchmark server after uploading the results [R Denoising/README.md]; restorch cannot "
                          "compute them"),
            unconfirmed=("the box size (512x512 in the DND paper; not read here)",),
        ),
        _gaussian("CBSD68", 68, "CBSD68"),
        _gaussian("Kodak24", 24, "Kodak"),
        _gaussian("McMaster", 18, "McMaster", count_in_name=False),
        _gaussian("Urban100", 100, "Urban100"),
        _deblurring("GoPro", 1111, "GoPro", _MATLAB_RGB + "; pairs by sorted order [R Motion_Deblurring/evaluate_gopro_hide.m]",
                    ("[R] Motion_Deblurring/evaluate_gopro_hide.m", "[T] count 1111 (11 test sequences)"),
                    count_confirmed=True),
        _deblurring("HIDE", 2025, "HIDE", _MATLAB_RGB + "; pairs by sorted order [R Motion_Deblurring/evaluate_gopro_hide.m]",
                    ("[R] Motion_Deblurring/evaluate_gopro_hide.m",)),
        _deblurring("RealBlur-J", 980, "RealBlur_J", _REALBLUR,
                    ("[RB] evaluation_RealBlur_ecc.py", "[R] Motion_Deblurring/evaluate_realblur.py"),
                    protocol=REALBLUR_PROTOCOL),
        _deblurring("RealBlur-R", 980, "RealBlur_R", _REALBLUR,
                    ("[RB] evaluation_RealBlur_ecc.py", "[R] Motion_Deblurring/evaluate_realblur.py"),
                    protocol=REALBLUR_PROTOCOL),
        Benchmark(
            "LOL-v1", "low_light", 15, "lol_v1", "eval15/low + eval15/high, same file names [T restorers LOL docs]",
            ("[T] LOL: 485 train + 15 test pairs, 400x600 (Wei et al., BMVC 2018, as summarised by the restorers docs)",),
            size=(400, 600), metric_notes=_GT_MEAN,
            unconfirmed=("the SSIM definition of the papers' scripts (not read)",),
        ),
        Benchmark(
            "LOL-v2-real", "low_light", 100, "lol_v2",
            "LOLv2/Real_captured/Test/Low + Normal (lowNNNNN.png pairs with normalNNNNN.png)",
            ("[T] 100 official test pairs", "HINT evaluates on LOL-v2 real and synthetic (shared/seeds/000, Fig. 4)"),
            metric_notes=_GT_MEAN,
            unconfirmed=("the SSIM definition and script of the papers (HINT's test_from_dataset_LOLv2_Real.py was not found)",),
        ),
        Benchmark(
            "LOL-v2-synthetic", "low_light", 100, "lol_v2", "LOLv2/Synthetic/Test/Low + Normal, same file names",
            ("HINT evaluates on LOL-v2 real and synthetic (shared/seeds/000, Fig. 4)",),
            metric_notes=_GT_MEAN, count_confirmed=False,
            unconfirmed=("the count 100 (no source read states it)", "the SSIM definition and script of the papers"),
        ),
        Benchmark(
            "SOTS-indoor", "dehazing", 500, "sots",
            "SOTS/indoor/hazy + gt (the gt folder is called clear/ in some copies: rename it gt/); hazy names carry "
            "the clean image's id first (1400_1.png -> 1400.png), several hazy images may share one clean image; "
            "the count is of hazy images",
            ("[T] RESIDE dataset module: SOTS indoor 500, outdoor 500",),
            unconfirmed=("the metric script of the papers (not read)",
                         "that the 500 hazy images come from 50 clean ones, 10 haze levels each, and their size (not read)"),
        ),
        Benchmark(
            "SOTS-outdoor", "dehazing", 500, "sots",
            "SOTS/outdoor/hazy + gt (clear/ in some copies: rename it gt/), hazy names prefixed by the clean id",
            ("[T] RESIDE dataset module and a thesis table: SOTS outdoor 500",),
            unconfirmed=("the metric script of the papers (not read)",),
        ),
        Benchmark(
            "Snow100K-2000", "desnowing", 2000, "restormer",
            "Snow100K/test2000/Snow (snowy) + test2000/Gt (.jpg), same names as HINT's scripts read them [H]; rename "
            "Snow/ to input/ and Gt/ to target/ for this check",
            ("[H] test_snow100k.py, evaluate_Snow100k.py", "count 2000: the subset's name"),
            metric_notes=("RGB PSNR and per-channel SSIM (cv2 Gaussian 11x11 sigma 1.5, 'valid'), no crop: restorch's "
                          "protocol; HINT restores with 256 px tiles overlapping 128 px [H]"),
            unconfirmed=("how the 2000 images were drawn from Snow100K's test set",),
        ),
        Benchmark(
            "Snow100K-L", "desnowing", 16801, "restormer",
            "the release has Snow100K-L/synthetic (snowy), gt and mask; rename synthetic/ to input/ and gt/ to target/",
            ("DesnowNet, Liu et al., TIP 2018 (arXiv 1708.04512): the Snow100K set and its S/M/L test subsets",),
            count_confirmed=False,
            unconfirmed=("the count 16801 (not found in a source read here)",
                         "which subset and which metric script HINT's evaluate_Snow100k.py uses (the script was not found)"),
        ),
        Benchmark(
            "ARAD-1K-val", "spectral_reconstruction", 50, "arad",
            "Valid_RGB/ARAD_1K_0901..0950.jpg + Valid_Spec/*.mat (MATLAB v7.3, variable cube, 31 bands) as released "
            "by the NTIRE 2022 challenge; MST++ instead keeps them in Train_RGB/Train_Spec and lists them in "
            "split_txt/valid_list.txt [MST README, hsi_dataset.py]",
            ("[MST] test_develop_code/test.py, hsi_dataset.py, utils.py, dataset/split_txt/valid_list.txt", "[GLMHA] split and size"),
            size=(482, 512),
            metric_notes=(
                "MRAE |pred - gt| / gt (no epsilon), RMSE, PSNR of both clamped to [0, 1] (peak 1), each on the crop "
                "[128:-128, 128:-128] and averaged over the 50 images; the RGB input is min-max normalised per image "
                "[MST test.py, hsi_dataset.py, utils.py]. The test set's cubes are withheld (challenge server)"
            ),
        ),
    ]
}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known benchmarks: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


# ------------------------------------------------------------------------------------------------
# checking a folder against an entry


def content_digest(root: Path, files: Iterable[Path]) -> str:
    """sha256 over the files' paths relative to `root` (sorted) and their bytes; stable across
    machines and copies (no modification times), changed by any byte."""
    root = Path(root)
    digest = hashlib.sha256(DIGEST_VERSION.encode())
    for relative in sorted({Path(path).relative_to(root).as_posix() for path in files}):
        path = root / relative
        digest.update(f"\n{relative}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


@dataclass
class BenchmarkCheck:
    benchmark: Benchmark
    root: Path
    count: int = 0
    files: list[Path] = field(default_factory=list)
    sizes: set[tuple[int, int]] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    digest: str | None = None

    def record(self, sigma: float | None = None) -> dict:
        """What a result computed on this folder records: benchmark, protocol (name and version), digest."""
        protocol = self.benchmark.protocol(sigma)
        return {"benchmark": self.benchmark.name, "task": self.benchmark.task, "protocol": protocol.as_dict(),
                "path": str(self.root), "count": self.count, "digest": self.digest}


def check_benchmark(root: Path, name: str) -> BenchmarkCheck:
    """Check `root` against the benchmark `name`; the digest is computed only when nothing is wrong."""
    benchmark = get_benchmark(name)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"benchmark folder {root} does not exist: check the path ({name} is laid out as {benchmark.release})")
    check = BenchmarkCheck(benchmark, root)
    {"sidd_blocks": _check_sidd, "dnd": _check_dnd}.get(benchmark.layout, _check_pairs)(check)
    if check.count != benchmark.count and not check.problems:
        message = (f"{root} holds {check.count} image(s), {name} has {benchmark.count}: "
                   + ("add the missing ones" if check.count < benchmark.count else "remove the extra ones")
                   + f" (the release: {benchmark.release})")
        (check.problems if benchmark.count_confirmed else check.warnings).append(
            message if benchmark.count_confirmed else f"{message}; the catalogue's count is not confirmed by a source")
    if benchmark.size is not None:
        wrong = sorted(size for size in check.sizes if size != benchmark.size)
        if wrong:
            check.problems.append(
                f"{name} images are {benchmark.size[0]}x{benchmark.size[1]} (HxW) but {root} has "
                f"{', '.join(f'{h}x{w}' for h, w in wrong)}: use the original files, not resized or cropped copies")
    if not check.problems:
        check.digest = content_digest(root, check.files)
    return check


def _check_pairs(check: BenchmarkCheck) -> None:
    from workloads.data import DatasetError, find_sources, scan_source

    benchmark, root = check.benchmark, check.root
    task = get_task(benchmark.task)
    try:
        found = find_sources(root, task)
    except DatasetError:
        found = []
    sources = [source for source in found if source.layout.name == benchmark.layout]
    if len(sources) != 1:
        listed = ", ".join(f"{source.split or '.'} ({source.layout.name} layout)" for source in found) or "no dataset"
        check.problems.append(f"{root} should hold one {benchmark.name} set laid out as {benchmark.release}; "
                              f"it holds {listed}: give the folder of the set itself, laid out like the release")
        return
    scan = scan_source(sources[0], task)
    check.problems += scan.problems
    check.count = len(scan.pairs)
    check.sizes = {(pair.height, pair.width) for pair in scan.pairs}
    check.files = [path for pair in scan.pairs for path in (pair.input, pair.target) if path is not None]


def _check_sidd(check: BenchmarkCheck) -> None:
    import scipy.io

    for file_name, variable in SIDD_FILES.items():
        path = check.root / file_name
        if not path.is_file():
            check.problems.append(f"{path} is missing: SIDD validation is {check.benchmark.release}")
            continue
        try:
            shapes = {name: shape for name, shape, _ in scipy.io.whosmat(path)}
        except Exception as err:  # scipy raises several types for v7.3 (HDF5) or damaged files
            check.problems.append(f"cannot list {path} as a MATLAB v5 file ({type(err).__name__}: {err}): use the released file")
            continue
        if shapes.get(variable) != SIDD_BLOCKS:
            check.problems.append(f"{path} should hold {variable} of shape {'x'.join(map(str, SIDD_BLOCKS))}, "
                                  f"holds {shapes}: use the released file")
            continue
        check.files.append(path)
        check.count = SIDD_BLOCKS[0] * SIDD_BLOCKS[1]
        check.sizes.add(SIDD_BLOCKS[2:4])


def _check_dnd(check: BenchmarkCheck) -> None:
    info, images = check.root / "info.mat", check.root / "images_srgb"
    if not info.is_file():
        check.problems.append(f"{info} (the bounding boxes) is missing: DND is {check.benchmark.release}")
    else:
        check.files.append(info)
    files = sorted(images.glob("*.mat")) if images.is_dir() else []
    expected = {f"{i:04d}.mat" for i in range(1, DND_IMAGES + 1)}
    missing = sorted(expected - {path.name for path in files})
    extra = sorted({path.name for path in files} - expected)
    if missing:
        check.problems.append(f"{images} lacks {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}: add them from the release")
    if extra:
        check.problems.append(f"{images} holds files DND does not have: {', '.join(extra[:10])}: remove them")
    check.files += [path for path in files if path.name in expected]
    check.count = len(files)
