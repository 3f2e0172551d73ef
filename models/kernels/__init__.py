"""Build gorgon's C++ CPU kernels with torch.utils.cpp_extension on first use, and cache the builds.

Builds go to $GORGON_EXTENSIONS_DIR (default ~/.cache/gorgon/torch_extensions), in a folder named after
the torch version, this CPU's instruction-set flags, the sources, the compiler flags and the environment
(torch's and Python's include folders): the kernels are compiled with -march=native, so a cache shared
between different machines must never hand one machine's binary to another, and two checkouts or two
environments (a clean clone and its venv beside a working tree) must not rebuild over each other's binary.

GORGON_CPU_ISA=avx2 (or scalar) builds them as for a CPU without AVX-512 (x86-64-v3; baseline x86-64) and runs
the quantized kernels' paths for it: how an AVX2-only machine runs, measured on a newer one.
GORGON_CPU_ISA=avx512 keeps the native build but leaves the AMX tiles (quantized and bf16 weights) off, as on an
AVX-512 CPU without AMX."""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import sysconfig
import time
from pathlib import Path
from types import ModuleType

import torch


def cpu_fingerprint() -> str:
    """Short hash of the CPU's feature flags (Linux), else of the machine name."""
    flags = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags += next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
    return hashlib.sha256(flags.encode()).hexdigest()[:12]


def target_arch() -> str:
    """GCC's -march for the builds: this CPU's, unless GORGON_CPU_ISA asks for an older one."""
    return {"avx2": "x86-64-v3", "scalar": "x86-64"}.get(os.environ.get("GORGON_CPU_ISA", ""), "native")


def compiler_flags() -> list[str]:
    # -fno-trapping-math: without AVX-512's masks, GCC will not vectorise a loop whose float operations it
    # must keep behind a branch (exp_nonpositive's clamp, after jump threading) lest they raise an exception
    # nobody reads; every result stays bitwise the same (no reassociation, no change of rounding)
    return ["-O3", f"-march={target_arch()}", "-fopenmp", "-fno-trapping-math"]


def build_folder(name: str, source: str) -> Path:
    """The folder of one source's build: one per torch, CPU, sources, flags and environment."""
    root = Path(os.environ.get("GORGON_EXTENSIONS_DIR", Path.home() / ".cache" / "gorgon" / "torch_extensions"))
    folder = Path(__file__).parent
    key = hashlib.sha256(b"".join(f.read_bytes() for f in [folder / source, *sorted(folder.glob("*.h"))]))
    key.update(" ".join(compiler_flags()).encode())
    # ninja rebuilds when a compile command changes, and the command names this torch's and this Python's
    # include folders: two environments (a clean clone's venv beside a working tree's) sharing one build
    # would each recompile it, silently, on every load after the other's
    key.update(f"{Path(torch.__file__).parent}|{sysconfig.get_paths()['include']}".encode())
    torch_version = torch.__version__.replace("+", "_")
    return root / f"{name}-torch{torch_version}-{cpu_fingerprint()}-{target_arch()}-{key.hexdigest()[:12]}"


def build(name: str, source: str, python_module: bool) -> ModuleType | None:
    """Compile (or load the cached build of) one C++ source of this folder. Raises whatever the build raises."""
    from torch.utils.cpp_extension import load

    folder = Path(__file__).parent
    build_dir = build_folder(name, source)
    built = build_dir / f"{name}.so"
    # torch marks a build in progress with a `lock` file, which a build killed midway (Ctrl-C during the
    # first run) leaves behind, and every later load then waits on forever. Our own lock is released by the
    # system when its process dies; whoever holds it is the only gorgon process building here, so a torch
    # lock it finds is stale.
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        guard = open(build_dir / "gorgon.lock", "w")
    except OSError as error:
        if built.is_file():  # a finished build on a read-only mount (a container image, a shared cache)
            return load_built(name, built, python_module)
        raise OSError(f"{error}; set GORGON_EXTENSIONS_DIR to a writable folder for the build") from error
    with guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        (build_dir / "lock").unlink(missing_ok=True)
        if not built.is_file():
            print(f"gorgon: compiling the {source} CPU kernels for this machine, once (a minute or two) ...",
                  file=sys.stderr, flush=True)
            remove_unused_builds(name, build_dir)
        # compiled from a copy inside the build folder (named by its contents, so copied once: a newer copy would
        # be rebuilt): ninja rebuilds when a source's path changes, so two checkouts of the same sources (a clean
        # clone beside a working tree) each rebuilt the other's binary, 1.5-2 min a load
        for file in [folder / source, *folder.glob("*.h")]:
            if not (build_dir / file.name).exists():
                shutil.copyfile(file, build_dir / file.name)
        return load(name=name, sources=[str(build_dir / source)], build_directory=str(build_dir),
                    is_python_module=python_module, extra_cflags=compiler_flags(),
                    extra_ldflags=["-fopenmp"], verbose=False)


def remove_unused_builds(name: str, build_dir: Path, days: int = 30) -> None:
    """Remove the other builds of `name` that no process has loaded for `days` (a load rewrites its folder's
    gorgon.lock): each change of the sources, flags or environment leaves a folder of 3-4 MB behind."""
    cutoff = time.time() - days * 86400
    for other in build_dir.parent.glob(f"{name}-*"):
        lock = other / "gorgon.lock"
        if other != build_dir and lock.is_file() and lock.stat().st_mtime < cutoff:
            shutil.rmtree(other, ignore_errors=True)


def load_built(name: str, built: Path, python_module: bool) -> ModuleType | None:
    """Load a finished build as torch's `load` does, without taking its locks or asking ninja about it."""
    if not python_module:
        torch.ops.load_library(built)
        return None
    spec = importlib.util.spec_from_file_location(name, built)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
