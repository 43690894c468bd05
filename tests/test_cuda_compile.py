"""The CUDA sources compile without a GPU: the kernels with the local nvcc (CUDA runtime
headers only), the torch binding syntax-checked with the host compiler against the installed
torch headers. Skipped where nvcc or the CUDA headers are absent. About 30-40 s on 2 cores."""

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp_ext

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")


def _cuda_include() -> Path | None:
    if NVCC is None:
        return None
    for base in (Path(NVCC).resolve().parents[1], Path("/usr/local/cuda")):
        if (base / "include" / "cuda_runtime_api.h").exists():
            return base / "include"
    return None


@needs_nvcc
@pytest.mark.parametrize("source", sorted((ROOT / "csrc" / "cuda").glob("*.cu")), ids=str)
def test_kernels_compile_with_nvcc(source, tmp_path):
    # The flags setup.py uses, for the GPUs the project targets (H100/H200: sm_90).
    cmd = [NVCC, "-c", "-std=c++17", "-O3", "--fmad=false", "-arch=sm_90",
           "-Werror=all-warnings", "-I", str(ROOT / "csrc"), str(source), "-o",
           str(tmp_path / "k.o")]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


@needs_nvcc
def test_binding_is_valid_cpp_against_torch_headers(tmp_path):
    include = _cuda_include()
    cxx = shutil.which("g++") or shutil.which("c++")
    if include is None or cxx is None:
        pytest.skip("no CUDA headers or host compiler")
    # A CPU build of torch ships c10/cuda headers but not the CMake-generated macros file.
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n")
    cmd = [cxx, "-fsyntax-only", "-std=c++17", "-I", str(ROOT / "csrc"), "-I", str(include),
           "-I", str(tmp_path), "-I", sysconfig.get_paths()["include"]]  # fmt: skip
    for inc in cpp_ext.include_paths():
        cmd += ["-I", inc]
    for source in sorted((ROOT / "csrc" / "cuda").glob("*_binding.cpp")):
        result = subprocess.run([*cmd, str(source)], capture_output=True, text=True, timeout=300)
        errors = [line for line in result.stderr.splitlines() if "error" in line]
        assert result.returncode == 0, "\n".join(errors[:20])
