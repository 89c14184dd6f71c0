"""Builds autobalance and its compiled ops (autobalance_ext._C).

The CPU kernels are always built, vectorised for the build machine's best
instruction set as PyTorch reports it (override with
AUTOBALANCE_CPU_CAPABILITY=DEFAULT|AVX2|AVX512, e.g. DEFAULT for a portable
build). The CUDA kernels are added when torch is a CUDA build and the CUDA
toolkit is found, or when FORCE_CUDA=1.
"""
import glob
import os
import sys

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import (CUDA_HOME, BuildExtension, CppExtension,
                                       CUDAExtension)

ROOT = os.path.dirname(os.path.abspath(__file__))

# Compiler flags and the ATen macros that select at::vec's implementation.
CPU_CAPABILITY_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
               "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
}


def cpu_capability():
    chosen = os.environ.get("AUTOBALANCE_CPU_CAPABILITY")
    if chosen is None:
        detect = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
        chosen = detect()
    chosen = chosen.upper()
    if chosen not in CPU_CAPABILITY_FLAGS:
        # e.g. ZVECTOR, SVE256 or VSX: build the portable kernels.
        chosen = "DEFAULT"
    return chosen


def openmp_flags():
    """In an OpenMP build of torch, at::parallel_for is an inline
    `#pragma omp parallel`: compiled without -fopenmp the kernels silently run
    on one thread. The extension's libgomp.so.1 resolves to the copy torch has
    already loaded (same soname), so there is one thread pool."""
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        return ["-fopenmp"]
    return []


def use_cuda():
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # the C++ standard is torch's choice
    cxx = ["-O3", "-g0"] + CPU_CAPABILITY_FLAGS[cpu_capability()] + openmp_flags()
    link = openmp_flags()
    if not use_cuda():
        return CppExtension("autobalance_ext._C", sources, extra_compile_args={"cxx": cxx},
                            extra_link_args=link)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    include_dirs = []
    # pip's CUDA 13 wheels keep headers that ATen/cuda/CUDAContext.h needs here.
    nvidia = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia")
    include_dirs += sorted(glob.glob(os.path.join(nvidia, "cu*", "include")))
    nvcc = ["-O3", "--use_fast_math", "-lineinfo"]
    return CUDAExtension("autobalance_ext._C", sources, include_dirs=include_dirs,
                         define_macros=[("WITH_CUDA", None)],
                         extra_compile_args={"cxx": cxx + ["-DWITH_CUDA"], "nvcc": nvcc},
                         extra_link_args=link)


setup(
    name="autobalance",
    version="0.1.0",
    description="AutoBalance: parametric cross-entropy tuned by bilevel optimisation, with fused kernels",
    package_dir={"": "python", "autobalance_ext": "autobalance_ext"},
    packages=find_packages("python") + ["autobalance_ext"],
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    # The library needs only these; the experiments need the extra.
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"experiments": ["matplotlib", "tqdm", "scikit-learn", "scipy", "mlxtend", "kornia"],
                    "augment": ["kornia"],
                    "test": ["pytest", "hypothesis", "expecttest", "kornia"]},
    entry_points={"console_scripts": ["autobalance=autobalance.experiments.cli:main"]},
)
