"""Build fasthess; the C++ extension is optional and never breaks the install.

* ``FASTHESS_NO_EXT=1`` skips the extension.
* CUDA sources (``csrc/cuda/*.cu``) are added only when torch is a CUDA build and
  nvcc is found.
* A failed compile prints a warning and leaves a working pure-Python package.

Install with ``pip install -e . --no-build-isolation`` so the build uses the torch
already installed (an isolated build would download a multi-GB CUDA torch).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup


def _extensions_and_cmdclass() -> tuple[list, dict]:
    if os.environ.get("FASTHESS_NO_EXT", "0") == "1":
        print("fasthess: FASTHESS_NO_EXT=1, skipping the C++ extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # torch missing: pure-Python install
        print(f"fasthess: torch not importable at build time ({exc}); pure-Python install", file=sys.stderr)
        return [], {}

    sources = sorted(glob.glob("csrc/*.cpp"))
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    use_cuda = bool(torch.version.cuda) and shutil.which("nvcc") is not None and os.environ.get("FASTHESS_NO_CUDA") != "1"
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        ext = CUDAExtension(
            "fasthess._C",
            sources,
            extra_compile_args={"cxx": cxx + ["-DFASTHESS_WITH_CUDA"], "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("fasthess._C", sources, extra_compile_args=cxx, extra_link_args=["-fopenmp"])

    class OptionalBuildExtension(BuildExtension):
        """Turns a failed compile into a warning: the package works without it."""

        def run(self) -> None:
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any compiler failure
                self._warn(exc)

        def build_extension(self, ext) -> None:  # type: ignore[override]
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001
                self._warn(exc)

        @staticmethod
        def _warn(exc: Exception) -> None:
            print(
                f"fasthess: WARNING: the C++ extension failed to build ({exc}); installing the "
                "pure-Python package (backend='cpp' will be unavailable).",
                file=sys.stderr,
            )

    # FASTHESS_NINJA=1 (benchmarks/gpu_check.sh): parallel compile with ninja, MAX_JOBS jobs
    use_ninja = os.environ.get("FASTHESS_NINJA") == "1" and shutil.which("ninja") is not None
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=use_ninja)}


ext_modules, cmdclass = _extensions_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
