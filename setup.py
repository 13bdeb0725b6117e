"""Builds resattn_fast._C: the op schemas, the CPU kernels and (when allowed) the CUDA kernels.

Environment:
  RESATTN_BUILD_CUDA=auto|0|1  auto (default): compile kernels/*.cu when nvcc is found, with
                               or without a GPU; 1: fail if they cannot be compiled; 0: CPU only.
  RESATTN_BUILD_EXT=auto|0|1   auto (default): build the extension, but if compiling fails
                               (no C++ compiler) install without it, with a warning: the
                               package then runs on the reference backend; 1: a failed build
                               fails the install (implied by RESATTN_BUILD_CUDA=1); 0: skip it.
  RESATTN_BUILD_CUDA_EMULATION=0|1
                               1: also build resattn_fast._C_cuda_emulated, the CUDA kernels
                               (kernels/*.cu) compiled by the host compiler against an
                               emulation of CUDA's execution model, so backend "cuda" runs on
                               CPU tensors (tests, CI); off by default.
  RESATTN_BUILD_CUDA_EMULATION_ASAN=0|1
                               1: also build resattn_fast._C_cuda_emulated_asan, the same with
                               AddressSanitizer (+ alignment checks); loaded only with
                               RESATTN_CUDA_EMULATION=asan and libasan preloaded (CI memcheck).
  RESATTN_BUILD_CUDA_EMULATION_TSAN=0|1
                               1: also build resattn_fast._C_cuda_emulated_tsan, the same with
                               ThreadSanitizer; loaded only with RESATTN_CUDA_EMULATION=tsan and
                               libtsan preloaded (CI racecheck: shared memory that no barrier
                               orders).
  TORCH_CUDA_ARCH_LIST         CUDA architectures; default: the visible GPUs', else 8.0;9.0.
  MAX_JOBS                     parallel compile jobs (ninja).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off"}


def _find_nvcc() -> str | None:
    """nvcc's real toolkit root, set as CUDA_HOME before torch reads it.

    torch guesses CUDA_HOME from `which nvcc`; a wrapper script at /usr/local/bin/nvcc
    makes that /usr/local, and the link then fails on -lcudart. Resolve the real toolkit.
    """
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    for candidate in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = candidate
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(home, "lib64")) or os.path.exists(os.path.join(home, "lib")):
            os.environ["CUDA_HOME"] = home
            return home
    return None


def _build_cuda(cuda_home: str | None) -> bool:
    flag = os.environ.get("RESATTN_BUILD_CUDA", "auto").strip().lower()
    if flag in FALSE:
        return False
    if flag not in TRUE and flag != "auto":
        sys.exit(f"RESATTN_BUILD_CUDA must be auto, 0 or 1, got {flag!r}")
    import torch

    if torch.version.cuda is None:
        if flag in TRUE:
            sys.exit("RESATTN_BUILD_CUDA=1 but this torch is a CPU-only build "
                     f"({torch.__version__}); install a CUDA build of torch.")
        return False
    if cuda_home is None:
        if flag in TRUE:
            sys.exit("RESATTN_BUILD_CUDA=1 but nvcc was not found: set CUDA_HOME to the CUDA "
                     "toolkit (e.g. /usr/local/cuda) or add nvcc to PATH.")
        return False
    return True


def _extensions():
    ext_flag = os.environ.get("RESATTN_BUILD_EXT", "auto").strip().lower()
    if ext_flag in FALSE:
        return [], {}
    # optional: setuptools skips (with a warning) an extension that fails to compile.
    optional = ext_flag not in TRUE and os.environ.get("RESATTN_BUILD_CUDA", "").strip() not in TRUE
    cuda_home = _find_nvcc()
    with_cuda = _build_cuda(cuda_home)
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3"]
    # No --use_fast_math: the kernels are memory-bound, and fast math would make the GPU's
    # sigmoid (expf) approximate and flush denormals, unlike the CPU backend, the emulated
    # build (csrc/emulation/) and PyTorch's own kernels.
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    define_macros = []
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "kernels")]
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")  # at::parallel_for uses the OpenMP backend of torch's build
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        sources += sorted(glob.glob("kernels/*.cu"))
        define_macros += [
            ("RESATTN_WITH_CUDA", None),
            ("RESATTN_CUDA_ARCHS", f'"{_arch_list()}"'),
            ("RESATTN_CUDA_VERSION", f'"{torch.version.cuda}"'),
        ]
        ext = CUDAExtension(
            "resattn_fast._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"] if sys.platform.startswith("linux") else [],
            optional=optional,
        )
    else:
        ext = CppExtension(
            "resattn_fast._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"] if sys.platform.startswith("linux") else [],
            optional=optional,
        )
    use_ninja = shutil.which("ninja") is not None or _has_ninja_module()
    return ([ext, *_emulation_extensions(CppExtension, include_dirs)],
            {"build_ext": _per_extension_build_dirs(BuildExtension.with_options(use_ninja=use_ninja))})


def _per_extension_build_dirs(base):
    """build_ext with one object directory per extension: the emulated module and its
    sanitizer twins compile the same sources with different flags, and would
    otherwise overwrite each other's objects (and rebuild both every time)."""

    class BuildExt(base):
        def build_extension(self, ext):
            shared = self.build_temp
            self.build_temp = os.path.join(shared, ext.name.rsplit(".", 1)[-1])
            try:
                super().build_extension(ext)
            finally:
                self.build_temp = shared

    return BuildExt


def _flag(name: str) -> bool:
    value = os.environ.get(name, "0").strip().lower()
    if value not in TRUE | FALSE:
        sys.exit(f"{name} must be 0 or 1, got {value!r}")
    return value in TRUE


def _emulation_extensions(CppExtension, include_dirs):
    """The emulated CUDA kernels: kernels/*.cu included by csrc/emulation/<op>.cpp and
    compiled by the host compiler with RESATTN_CUDA_EMULATION (cuda_emulation.h)."""
    if not _flag("RESATTN_BUILD_CUDA_EMULATION"):
        return []
    sources = sorted(glob.glob("csrc/emulation/*.cpp"))
    include_dirs = [*include_dirs, os.path.join(ROOT, "csrc", "emulation")]
    # Strict aliasing off: the kernels read float buffers through 128-bit vector structs,
    # which nvcc allows and a host optimiser need not.
    # `#pragma unroll` is nvcc's; the host compiler ignores it.
    cxx = ["-O2", "-fno-strict-aliasing", "-pthread", "-Wno-unknown-pragmas",
           "-DRESATTN_CUDA_EMULATION"]
    exts = [CppExtension("resattn_fast._C_cuda_emulated", sources, include_dirs=include_dirs,
                         extra_compile_args={"cxx": cxx}, extra_link_args=["-pthread"])]
    if _flag("RESATTN_BUILD_CUDA_EMULATION_ASAN"):
        # Out-of-bounds accesses of tensors and shared memory, and misaligned vector
        # accesses (a fault on a GPU), abort the process with a report.
        sanitize = ["-fsanitize=address,alignment", "-fno-sanitize-recover=alignment"]
        exts.append(CppExtension(
            "resattn_fast._C_cuda_emulated_asan", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": [*cxx, "-O1", "-fno-omit-frame-pointer", *sanitize]},
            extra_link_args=["-pthread", *sanitize]))
    if _flag("RESATTN_BUILD_CUDA_EMULATION_TSAN"):
        # Accesses of shared (and global) memory by two threads of a block that no barrier
        # (__syncthreads, a warp exchange) orders are reported as data races.
        sanitize = ["-fsanitize=thread"]
        exts.append(CppExtension(
            "resattn_fast._C_cuda_emulated_tsan", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": [*cxx, "-O1", "-fno-omit-frame-pointer", *sanitize]},
            extra_link_args=["-pthread", *sanitize]))
    return exts


def _arch_list() -> str:
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ";")
    import torch

    caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return ";".join(f"{a}.{b}" for a, b in sorted(caps))


def _has_ninja_module() -> bool:
    try:
        import ninja  # noqa: F401
    except ImportError:
        return False
    return True


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
