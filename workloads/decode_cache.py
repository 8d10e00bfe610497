"""Images and cubes decoded once per node into raw arrays, read back by memory map.

A dataset's files are decoded (`workloads.files.read_raw`: images in their own dtype, uint8 or
uint16, cubes as float32) into `<cache>/decoded/<digest>/NNNNNN.npy`, one file each, with an index
of their shapes; `<digest>` covers the files' relative paths, sizes and modification times, so an
edited, added or removed file makes a new entry. Training crops are then cut from
`np.load(..., mmap_mode="r")`: the page cache holds the hot pixels and no image is decoded again,
not by the next trial, restart or pbt segment either. A file that cannot be read is recorded as
such (its problem is reported by the dataset check, as when reading it directly).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from workloads.files import read_raw
from workloads.node_cache import build_once, listing_digest

# Bump when read_raw's output for a file changes: every node then decodes its datasets anew.
DECODE_VERSION = "decoded-1"
INDEX = "index.json"
# Memory maps a process keeps open (each holds a file descriptor): mapping a file anew costs more than
# cutting a crop from it.
MAX_OPEN_ARRAYS = 256


class UnreadableFile(ValueError):
    """A file the decoder could not read; the message is the reader's error."""


class DecodedFiles:
    """The raw arrays of `files` (all under `root`), decoded into the cache at `cache` unless there already."""

    def __init__(self, root: Path, files: list[Path], cache: Path) -> None:
        self.root = root
        stats = {path: path.stat() for path in files}
        digest = listing_digest(((self._key(path), stat.st_size, stat.st_mtime_ns) for path, stat in stats.items()),
                                version=DECODE_VERSION)
        self.folder = cache / "decoded" / digest
        self.built = build_once(self.folder, lambda folder: _decode(files, folder, self._key))
        index = json.loads((self.folder / INDEX).read_text())
        self.entries: dict[Path, dict] = {path: index[self._key(path)] for path in files}
        self._open: dict[Path, np.ndarray] = {}

    def _key(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def shape(self, path: Path) -> tuple[int, int, int]:
        entry = self.entries[path]
        if "error" in entry:
            raise UnreadableFile(entry["error"])
        return tuple(entry["shape"])

    def array(self, path: Path) -> np.ndarray:
        """The raw array of `path`, memory-mapped read-only; the maps last used stay open."""
        mapped = self._open.pop(path, None)
        if mapped is None:
            mapped = np.load(self.folder / self.entries[path]["file"], mmap_mode="r")
            if len(self._open) >= MAX_OPEN_ARRAYS:
                self._open.pop(next(iter(self._open)))  # the least recently used
        self._open[path] = mapped
        return mapped

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}  # a spawned loader process maps the files itself


def _decode(files: list[Path], folder: Path, key: Callable[[Path], str]) -> None:
    def decode(numbered: tuple[int, Path]) -> tuple[str, dict]:
        number, path = numbered
        try:
            raw = read_raw(path)
        except Exception as err:  # readers raise many types (OSError, SyntaxError, zlib/HDF5 errors...)
            return key(path), {"error": f"{type(err).__name__}: {err}"}
        name = f"{number:06d}.npy"
        np.save(folder / name, np.ascontiguousarray(raw))  # C order: a crop's rows are contiguous
        return key(path), {"file": name, "shape": list(raw.shape)}

    # Pillow and zlib release the GIL while decoding: threads use every core of the node.
    with ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0))) as pool:
        index = dict(pool.map(decode, enumerate(files)))
    (folder / INDEX).write_text(json.dumps(index))
