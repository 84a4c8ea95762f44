"""Build of fastlstm's one extension, ``fastlstm._C``.

A CUDAExtension when the installed torch has CUDA and nvcc is found (every ``csrc/**/*.cu`` is
compiled), otherwise a CppExtension. Environment knobs:

* ``TORCH_CUDA_ARCH_LIST``   CUDA targets, honoured as torch does (CI builds ``9.0``).
* ``FASTLSTM_FORCE_CPU=1``   build the CPU kernels only, even where CUDA is available.
* ``FASTLSTM_CPU_SIMD``      the widest SIMD level to compile the CPU kernels for: ``avx512``
  (default on x86-64: default, AVX2 and AVX-512 variants, plus the AVX512-BF16 bfloat16 kernels),
  ``avx2`` or ``default`` (for a compiler without AVX-512 support, or a faster build). The build
  machine's own CPU plays no part: the level is chosen when the extension loads
  (csrc/cpu/cpu_capability.cpp).
* ``FASTLSTM_PTXAS_VERBOSE=1`` print ptxas register/shared-memory reports.
"""

from __future__ import annotations

import glob
import os
import platform
import shutil
import sys
import sysconfig

from setuptools import setup



def _locate_cuda_home() -> None:
    """Point CUDA_HOME at the toolkit when nvcc is only a symlink (torch would take its parent dir)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for nvcc in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if nvcc and os.path.exists(nvcc):
            home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
            if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
                os.environ["CUDA_HOME"] = home
                return


_locate_cuda_home()

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - exercised only without torch
    sys.exit(
        "fastlstm builds against an installed PyTorch. Install torch first, then build without "
        "isolation:\n    pip install torch\n    pip install --no-build-isolation -e ."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(paths: list[str]) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _want_cuda() -> bool:
    if os.environ.get("FASTLSTM_FORCE_CPU") == "1":
        return False
    if torch.version.cuda is None or CUDA_HOME is None:
        return False
    return os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")) or shutil.which("nvcc") is not None


# Flags of each SIMD level's compilation of the CPU kernels (csrc/cpu/kernels/), as ATen's.
_LEVEL_FLAGS = {
    "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "avx2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
}
_KERNEL_SOURCES = _rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "kernels", "*.cpp")))
# The bfloat16 kernels (vdpbf16ps, AMX tiles) exist at one more level only, compiled with the
# AVX-512 flags plus AVX512-BF16 and AMX into namespace AVX512_BF16 (ATen's vec headers see
# CPU_CAPABILITY_AVX512); csrc/cpu/cpu_capability.cpp calls them only on a CPU with AVX512_BF16
# (and AMX-BF16 for the tile kernels) at the AVX512 level.
_BF16_LEVEL = "avx512_bf16"
_BF16_FLAGS = [f for f in _LEVEL_FLAGS["avx512"] if not f.startswith("-DCPU_CAPABILITY=")] + [
    "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-DCPU_CAPABILITY=AVX512_BF16", "-DCPU_CAPABILITY_AVX512_BF16"]
_BF16_SOURCES = _rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "kernels", "avx512_bf16", "*.cpp")))


def _compiled_levels() -> list[str]:
    """The SIMD levels to compile the kernels for, narrowest first (the link order, see below)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["default"]
    widest = os.environ.get("FASTLSTM_CPU_SIMD", "avx512").lower()
    levels = list(_LEVEL_FLAGS)
    if widest not in levels:
        sys.exit(f"FASTLSTM_CPU_SIMD must be one of {', '.join(levels)}, got {widest!r}")
    return levels[: levels.index(widest) + 1]


def _kernel_builds() -> list[tuple[str, list[str], list[str]]]:
    """(level, sources, flags) of each compilation of the kernels, narrowest first (the link order)."""
    builds = [(level, _KERNEL_SOURCES, _LEVEL_FLAGS[level]) for level in _compiled_levels()]
    if "avx512" in _compiled_levels():
        builds.append((_BF16_LEVEL, _BF16_SOURCES, _BF16_FLAGS))
    return builds


def _level_macros() -> list[str]:
    """Tell the dispatcher (csrc/cpu/kernel_table.h, bf16_kernels_cpu.h) which levels have kernels."""
    return [f"-DFASTLSTM_CPU_{level.upper()}" for level, _, _ in _kernel_builds() if level != "default"]


class _BuildExtension(BuildExtension):
    """torch's BuildExtension, plus the kernel sources compiled once per SIMD level.

    Each level is a ninja build of its own in ``<build_temp>/cpu-<level>`` with that level's flags
    (setuptools has no per-file flags); its objects are linked into the one extension. They come
    after the other objects, narrowest level first: where two objects define the same inline
    function, the linker keeps the first, so a wider level's copy never serves narrower code.
    pip's editable build would compile in a fresh temporary directory every time; it builds in
    the persistent build directory instead, so ninja recompiles only what changed.
    """

    def build_extensions(self) -> None:
        if getattr(self, "editable_mode", False):
            self.build_temp = os.path.join(ROOT, "build", f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}")
        super().build_extensions()

    def build_extension(self, ext) -> None:
        objects = []
        for level, sources, flags in _kernel_builds():
            objects += self.compiler.compile(
                sources,
                output_dir=os.path.join(self.build_temp, f"cpu-{level}"),
                macros=ext.define_macros,
                include_dirs=ext.include_dirs,
                debug=self.debug,
                extra_postargs={"cxx": ext.extra_compile_args["cxx"] + flags},
                depends=ext.depends,
            )
        ext.extra_objects = [o for o in ext.extra_objects if o not in objects] + objects
        super().build_extension(ext)


def _wheel_cuda_dirs() -> tuple[list[str], list[str]]:
    """cuBLAS headers and libraries shipped in the torch wheel (nvidia/cu*/), when CUDA_HOME lacks them."""
    if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "include", "cublas_v2.h")):
        return [], []
    for base in sys.path:
        for inc in sorted(glob.glob(os.path.join(base, "nvidia", "cu*", "include"))):
            if os.path.exists(os.path.join(inc, "cublas_v2.h")):
                return [inc], [os.path.join(os.path.dirname(inc), "lib")]
        inc = os.path.join(base, "nvidia", "cublas", "include")
        if os.path.exists(os.path.join(inc, "cublas_v2.h")):
            return [inc], [os.path.join(base, "nvidia", "cublas", "lib")]
    return [], []


def _cublas_link_args(lib_dirs: list[str]) -> list[str]:
    for d in lib_dirs:
        versioned = sorted(glob.glob(os.path.join(d, "libcublas.so.*")))
        if versioned and not os.path.exists(os.path.join(d, "libcublas.so")):
            return [f"-L{d}", f"-l:{os.path.basename(versioned[0])}", f"-Wl,-rpath,{d}"]
    return ["-lcublas"] + [f"-L{d}" for d in lib_dirs]


def _default_cuda_arch() -> None:
    # Without a visible GPU torch would build for every architecture it knows: pick Hopper instead.
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        print("fastlstm: no GPU visible and TORCH_CUDA_ARCH_LIST unset; building CUDA kernels for 9.0")


def _openmp_flags() -> list[str]:
    # at::parallel_for runs serially in code compiled without OpenMP, even inside a torch that has it.
    return ["-fopenmp"] if torch.backends.openmp.is_available() and sys.platform.startswith("linux") else []


def _extension():
    cxx = ["-O3", "-Wall", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized"] + _level_macros() + _openmp_flags()
    sources = _rel([os.path.join(ROOT, "csrc", "ops.cpp"), os.path.join(ROOT, "csrc", "op_schemas.cpp")]
                   + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not _want_cuda():
        return CppExtension("fastlstm._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx},
                            extra_link_args=_openmp_flags())

    _default_cuda_arch()
    inc, libs = _wheel_cuda_dirs()
    # -isystem: searched after the toolkit's own -I headers, which the wheel's must not shadow.
    wheel_includes = [flag for d in inc for flag in ("-isystem", d)]
    sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
    sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True))
    nvcc = ["-O3", "-lineinfo", "-DFASTLSTM_WITH_CUDA", "--expt-relaxed-constexpr"]
    if os.environ.get("FASTLSTM_PTXAS_VERBOSE") == "1":
        nvcc += ["-Xptxas", "-v"]
    return CUDAExtension(
        "fastlstm._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx + wheel_includes + ["-DFASTLSTM_WITH_CUDA"], "nvcc": nvcc + wheel_includes},
        extra_link_args=_cublas_link_args(libs) + _openmp_flags(),
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": _BuildExtension.with_options(use_ninja=True)},
)
