"""Where a command writes, checked before it computes anything: an existing file or the command's own
input is replaced only when the user asked for it (--overwrite), and a folder of outputs is never the
folder of inputs or inside it (the next run would read the outputs as inputs).

`overwrite` is the command's --overwrite flag, or None for a command that has none (the message then
offers only another path).
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def _or_overwrite(overwrite: bool | None, what: str) -> str:
    return "" if overwrite is None else f", or add --overwrite to replace {what}"


def check_output_file(path: Path, *, option: str, inputs: Iterable[Path] = (), overwrite: bool | None = False) -> None:
    """Refuse writing the file `path` (the value of `option`) when it is a folder, one of `inputs`,
    or an existing file, unless `overwrite`."""
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder: give a file path")
    if overwrite or not path.exists():
        return
    if any(path.resolve() == source.resolve() for source in inputs):
        raise ValueError(f"{option} {path} is the input itself: write the result to another file"
                         f"{_or_overwrite(overwrite, 'the input')}")
    raise ValueError(f"{option} {path} exists: choose another path{_or_overwrite(overwrite, 'it')}")


def check_output_folder(folder: Path, *, option: str, names: Iterable[str] | None = None,
                        inputs: Iterable[Path] = (), overwrite: bool | None = False) -> None:
    """Refuse writing into `folder` (the value of `option`) when it is a file, is or lies inside one of
    the folders `inputs`, or, unless `overwrite`, already holds a file of `names` (None: anything)."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{option} {folder} is a file, not a folder: choose a folder")
    resolved = folder.resolve()
    for source in inputs:
        if resolved == source.resolve() or source.resolve() in resolved.parents:
            where = "is" if resolved == source.resolve() else "is inside"
            raise ValueError(f"{option} {folder} {where} the input folder {source}: write the results to a "
                             "folder outside it")
    if overwrite or not folder.is_dir():
        return
    if names is None:
        if any(folder.iterdir()):
            raise ValueError(f"{option} {folder} is not empty: choose another folder, or empty it first"
                             f"{_or_overwrite(overwrite, 'the files of the same names in it')}")
        return
    existing = sorted(name for name in names if (folder / name).exists())
    if existing:
        listed = ", ".join(existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise ValueError(f"{option} {folder} already holds {listed}: choose another folder"
                         f"{_or_overwrite(overwrite, 'them')}")
