"""DeepSpeed's CPU communication op: compiled once per Python environment, never waited on forever.

On CPU, `deepspeed.initialize` JIT-compiles a small C++ shared-memory op with
torch.utils.cpp_extension (about 50 s) into TORCH_EXTENSIONS_DIR. Three traps:
- two environments (e.g. two virtualenvs) overwrite each other's build in the default directory
  (~/.cache/torch_extensions, shared by every environment of the user), so every switch recompiles;
- a process killed while compiling leaves torch's `lock` file behind, and every later job waits on
  it forever;
- two ninja programs (the `ninja` package of the environment, a Debian `ninja-build` on PATH) hash
  the build's commands differently (ninja 1.13 and 1.11): a build by one looks out of date to the
  other, and processes with different PATHs (a Ray node started from an activated virtualenv, a
  CLI run without) recompile the op in turn, about 50 s on every switch.
`prepare_cpu_comm_op` gives each environment its own directory (unless the user set one), builds with
the environment's own ninja, and compiles under an OS file lock, which the kernel releases when its
holder dies: a torch `lock` file found while holding it belongs to a dead build and is removed.

    python -m workloads.deepspeed_ops     # compile ahead of time (`make install` does)
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from workloads.node_cache import locked

SHM_OP = "deepspeed_shm_comm"
log = logging.getLogger(__name__)


def extensions_dir() -> Path:
    """TORCH_EXTENSIONS_DIR if set, else a directory of this Python environment's own."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    environment = hashlib.sha1(sys.prefix.encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "restorch" / "torch_extensions" / environment


def prepare_cpu_comm_op() -> Path | None:
    """Point torch's JIT builds at this environment's directory and compile DeepSpeed's CPU op there.

    Call before `deepspeed.initialize` in every process that runs DeepSpeed; on a GPU it does
    nothing. After the first compile it only loads the cached library (about 0.1 s).
    """
    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm.torch import build_shm_op

    if get_accelerator().device_name() != "cpu":
        return None
    root = extensions_dir()
    os.environ["TORCH_EXTENSIONS_DIR"] = str(root)

    with locked(root / ".restorch-build.lock"), environment_ninja_first():  # the lock: released if its holder dies
        stale = root / SHM_OP / "lock"
        if stale.exists():
            log.warning("removing %s left by a DeepSpeed op build that was killed", stale)
            stale.unlink(missing_ok=True)
        build_shm_op()  # DeepSpeed keeps the loaded op: its later calls in this process build nothing
    return root


@contextmanager
def environment_ninja_first() -> Iterator[None]:
    """PATH with the directory of this environment's `ninja` (the package) first, for torch's build."""
    import ninja

    path = os.environ.get("PATH", "")
    os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{path}"
    try:
        yield
    finally:
        os.environ["PATH"] = path


if __name__ == "__main__":
    print(f"DeepSpeed CPU op ready in {prepare_cpu_comm_op()}")
