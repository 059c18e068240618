"""Build and install cascade-clip.

``kernels/`` is installed as the subpackage ``cascade_clip.kernels`` (never as a top-level ``kernels``, which is another
PyPI project's name). The C++ extension ``cascade_clip._C`` is built from ``csrc/`` with torch's ``BuildExtension``;
install with ``pip install --no-build-isolation -e .`` so the build sees the installed torch instead of downloading one.
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    """The ``cascade_clip._C`` extension, or nothing when csrc/ has no sources or torch is absent at build time."""
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME
        import torch
    except ImportError:
        return [], {}
    # torch >= 2.10 headers require C++20 (ATen.h errors out under C++17).
    # -fno-trapping-math: the kernels never read floating-point exception flags, and without it GCC will not
    # if-convert (so not vectorise) loops whose selects compare NaN-capable values on AVX2. Values are unchanged
    # (unlike -ffast-math, no reassociation and no finite-math assumptions).
    extra_compile_args = {"cxx": ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math"]}
    extra_link_args = ["-fopenmp"]
    # The torch version this build is for, compiled into the library so that a stale build can say so at import.
    macros = [("CASCADE_CLIP_TORCH_VERSION", '"%s"' % torch.__version__)]
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    use_cuda = (
        bool(cuda_sources)
        and os.environ.get("CASCADE_CLIP_NO_CUDA", "0") != "1"
        and torch.version.cuda is not None
        and CUDA_HOME is not None
    )
    if use_cuda:
        extra_compile_args["nvcc"] = ["-O3", "-std=c++20"]
        ext = CUDAExtension(
            "cascade_clip._C",
            sources + cuda_sources,
            define_macros=macros + [("CASCADE_CLIP_WITH_CUDA", "1")],
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
        )
    else:
        ext = CppExtension(
            "cascade_clip._C",
            sources,
            define_macros=macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=False)}


ext_modules, cmdclass = _extensions()

setup(
    name="cascade-clip",
    version="0.1.0",
    description="Fast, faithful Cascade-CLIP zero-shot semantic segmentation (ICML 2024)",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["cascade_clip", "cascade_clip.ops", "cascade_clip.kernels"],
    package_dir={"cascade_clip": "cascade_clip", "cascade_clip.kernels": "kernels"},
    package_data={"cascade_clip": ["data/*.json"]},
    install_requires=["torch>=2.6", "triton", "open_clip_torch==3.3.0", "numpy", "pillow"],
    extras_require={"test": ["pytest", "pytest-benchmark"], "xformers": ["xformers"]},
    entry_points={"console_scripts": ["cascade-clip=cascade_clip.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
