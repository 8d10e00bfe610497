"""Reading and writing images and spectral cubes as HxWxC float32 arrays.

Images: PNG (8 and 16 bit), JPEG, BMP, TIFF; values scaled to [0, 1] from their integer range
(float TIFFs are taken as already in [0, 1]). Pillow truncates 16-bit colour PNGs to 8 bit, so those
go through pypng. Cubes: `.npy` (HxWxB) and MATLAB `.mat`, both v7.3 (HDF5, as ARAD_1K ships) and
older versions; the variable `cube` is read, or the file's only 3-D array.

`read_raw` gives a file's array as stored (images in their integer dtype, cubes as float32), the
form the node's decode cache keeps (workloads/decode_cache.py); `to_float` scales it as `read_array`
does, so a crop of a raw array and the same crop of `read_array`'s result are equal.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import png
import scipy.io
import tifffile
from PIL import Image

from workloads.metrics import quantize

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
CUBE_SUFFIXES = (".npy", ".mat")
DATA_SUFFIXES = IMAGE_SUFFIXES + CUBE_SUFFIXES
CUBE_VARIABLE = "cube"  # ARAD_1K's name for the spectral cube in its .mat files


def read_array(path: Path) -> np.ndarray:
    """An image or a cube, by file suffix, as HxWxC float32."""
    return to_float(read_raw(path))


def read_raw(path: Path) -> np.ndarray:
    """An image or a cube as HxWxC in its stored dtype (uint8, uint16 or float images; float32 cubes)."""
    return read_cube(path) if path.suffix.lower() in CUBE_SUFFIXES else _read_image_raw(path)


def to_float(raw: np.ndarray, order: str = "K") -> np.ndarray:
    """An array of `read_raw` as float32 (laid out in memory by `order`, as numpy's): integer images
    scaled to [0, 1] from their dtype's range. The division in float32 is correctly rounded: the same
    values as dividing in float64 and rounding (checked for every uint8 and uint16 value)."""
    if np.issubdtype(raw.dtype, np.integer):
        return np.divide(raw, np.iinfo(raw.dtype).max, dtype=np.float32, order=order)
    return raw.astype(np.float32, order=order)


def read_image(path: Path) -> np.ndarray:
    """An image as HxWxC float32 in [0, 1] (C = 1 for grey, 3 for colour; alpha is dropped)."""
    return to_float(_read_image_raw(path))


def _read_image_raw(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        data = tifffile.imread(path)
    elif suffix == ".png" and _png_bit_depth(path) == 16:
        data = _read_png16(path)
    else:
        with Image.open(path) as image:
            if image.mode not in ("L", "RGB"):  # palette, alpha, 1-bit, CMYK
                image = image.convert("L" if image.mode in ("1", "LA") else "RGB")
            data = np.asarray(image)
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 2-D image, got an array of shape {data.shape}")
    if data.shape[-1] in (2, 4):  # grey + alpha, RGB + alpha
        data = data[..., :-1]
    return data


def _png_bit_depth(path: Path) -> int:
    with open(path, "rb") as file:
        header = file.read(25)  # 8-byte signature, IHDR length and type, width, height, bit depth
    return header[24] if len(header) == 25 else 0


def _read_png16(path: Path) -> np.ndarray:
    width, height, rows, info = png.Reader(filename=str(path)).asDirect()
    return np.vstack([np.asarray(row, dtype=np.uint16) for row in rows]).reshape(height, width, info["planes"])


def read_cube(path: Path) -> np.ndarray:
    """A spectral cube as HxWxB float32."""
    if path.suffix.lower() == ".npy":
        return np.load(path).astype(np.float32)
    if h5py.is_hdf5(path):
        with h5py.File(path, "r") as file:
            name = _cube_variable({key: file[key].shape for key in file if isinstance(file[key], h5py.Dataset)}, path)
            # MATLAB writes column-major, so h5py sees the HxWxB cube as BxWxH.
            return np.transpose(file[name][()], (2, 1, 0)).astype(np.float32)
    variables = scipy.io.loadmat(path)
    name = _cube_variable({key: np.shape(value) for key, value in variables.items() if not key.startswith("__")}, path)
    return np.asarray(variables[name], dtype=np.float32)


def array_shape(path: Path) -> tuple[int, int, int]:
    """(H, W, C) of an image or cube. Images are decoded in full, so a truncated file fails here
    rather than during training; cubes are only opened (their headers name the shape)."""
    suffix = path.suffix.lower()
    if suffix not in CUBE_SUFFIXES:
        return _read_image_raw(path).shape
    if suffix == ".npy":
        shape = np.load(path, mmap_mode="r").shape
    elif h5py.is_hdf5(path):
        with h5py.File(path, "r") as file:
            shapes = {key: file[key].shape for key in file if isinstance(file[key], h5py.Dataset)}
            shape = shapes[_cube_variable(shapes, path)][::-1]
    else:
        shapes = {name: shape for name, shape, _ in scipy.io.whosmat(path)}
        shape = shapes[_cube_variable(shapes, path)]
    if len(shape) != 3:
        raise ValueError(f"{path}: expected an HxWxB cube, got shape {shape}")
    return tuple(shape)


def _cube_variable(shapes: dict[str, tuple[int, ...]], path: Path) -> str:
    if CUBE_VARIABLE in shapes:
        return CUBE_VARIABLE
    cubes = [name for name, shape in shapes.items() if len(shape) == 3]
    if len(cubes) != 1:
        raise ValueError(
            f"{path}: cannot tell which variable is the cube (variables: {', '.join(shapes) or 'none'}); "
            f"save it as '{CUBE_VARIABLE}'"
        )
    return cubes[0]


def image_bit_depth(path: Path) -> int:
    """16 for 16-bit PNGs and TIFFs, else 8 (the depth a restored copy of the image is saved in)."""
    suffix = path.suffix.lower()
    if suffix == ".png":
        return 16 if _png_bit_depth(path) == 16 else 8
    if suffix in (".tif", ".tiff"):
        with tifffile.TiffFile(path) as tiff:
            return 16 if tiff.pages[0].dtype == np.uint16 else 8
    return 8


def write_image(path: Path, image: np.ndarray, bit_depth: int = 8) -> None:
    """Save an HxWxC float image in [0, 1] as 8-bit (quantised like the metrics do) or 16-bit
    (PNG or TIFF)."""
    if bit_depth == 8:
        data = quantize(image)
        Image.fromarray(data[..., 0] if data.shape[-1] == 1 else data).save(path)
        return
    if bit_depth != 16 or path.suffix.lower() not in (".png", ".tif", ".tiff"):
        raise ValueError(f"{path}: 16-bit output needs a .png or .tif file; got bit depth {bit_depth}")
    data = np.round(np.clip(image, 0.0, 1.0) * 65535).astype(np.uint16)
    if path.suffix.lower() == ".png":
        writer = png.Writer(data.shape[1], data.shape[0], greyscale=data.shape[-1] == 1, bitdepth=16)
        with path.open("wb") as file:
            writer.write(file, data.reshape(data.shape[0], -1))
    else:
        tifffile.imwrite(path, data[..., 0] if data.shape[-1] == 1 else data)


def write_cube(path: Path, cube: np.ndarray) -> None:
    """Save an HxWxB cube as float32 .npy."""
    np.save(path, np.asarray(cube, dtype=np.float32))
