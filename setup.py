"""Builds dpseg._C: the C++ ops (CPU always), plus CUDA kernels when they can be built.

DPSEG_BUILD_CUDA=1 forces the CUDA build (fails loudly if it cannot), =0 skips it; unset,
CUDA is built when nvcc is on PATH and the installed torch is a CUDA build. The switch is
about what gets compiled, never about which hardware is present at run time.
"""

import glob
import os
import shutil

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    flag = os.environ.get("DPSEG_BUILD_CUDA")
    if flag is not None:
        return flag.strip() not in ("", "0", "false", "no")
    return torch.version.cuda is not None and shutil.which("nvcc") is not None


def extension():
    rel = lambda pattern: sorted(  # noqa: E731
        os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern))
    )
    sources = rel("csrc/ops.cpp") + rel("csrc/cpu/*.cpp")
    # -ffp-contract=off: no fused multiply-add, so the Philox Gaussian is the same bits as
    # the pure-PyTorch reference, which rounds after every operation. -fno-math-errno: sqrt
    # (correctly rounded either way) compiles to vsqrtpd instead of a call that sets errno,
    # so the noise loops vectorise.
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
    kwargs = dict(include_dirs=[os.path.join(HERE, "csrc")], extra_link_args=["-fopenmp"])
    if want_cuda():
        sources += rel("csrc/cuda/*.cu") + rel("csrc/cuda/*_binding.cpp")
        nvcc = ["-O3", "--fmad=false", "-std=c++17"]
        return CUDAExtension(
            "dpseg._C",
            sources,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            define_macros=[("DPSEG_WITH_CUDA", None)],
            **kwargs,
        )
    return CppExtension("dpseg._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    ext_modules=[extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)}
)
