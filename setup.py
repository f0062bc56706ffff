"""Build and install fastchat-core.

The top-level folders triton_kernels/, train/, serve/ and bench/ are installed *under* fastchat_core so
that nothing claims a generic top-level import name (vLLM users already have OpenAI's `triton_kernels`).
csrc/ becomes the compiled extension fastchat_core._C: C++ everywhere, plus CUDA when torch has CUDA and
nvcc is found. Build needs torch already installed (use --no-build-isolation).
"""
import glob
import os

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as e:  # pragma: no cover - a user error with a clear fix
    raise SystemExit(
        "fastchat-core builds a PyTorch extension, so torch must be installed first:\n"
        "  pip install torch==2.13.0            # CPU build\n"
        "  pip install --no-build-isolation -e .\n"
    ) from e


def extensions():
    sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    if not sources or os.environ.get("FASTCHAT_NO_EXT") == "1":  # no sources, or a prebuilt _C is in place
        return []
    use_cuda = (
        bool(cuda_sources)
        and torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.environ.get("FASTCHAT_NO_CUDA", "0") != "1"
    )
    cxx = ["-O3"]  # torch picks the C++ standard its headers need (C++20 in recent releases)
    if use_cuda:
        nvcc = ["-O3", "--use_fast_math", "-DUSE_CUDA"]
        # Hopper first; the arch list can be overridden with TORCH_CUDA_ARCH_LIST as usual.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        return [CUDAExtension("fastchat_core._C", sources + cuda_sources,
                              extra_compile_args={"cxx": cxx + ["-DUSE_CUDA"], "nvcc": nvcc})]
    return [CppExtension("fastchat_core._C", sources, extra_compile_args={"cxx": cxx})]


setup(
    name="fastchat-core",
    version="0.1.0",
    description="Train and serve your own small ChatGPT: tokenizer to RL to a continuous-batching server",
    python_requires=">=3.10",
    packages=[
        "fastchat_core",
        "fastchat_core.tasks",
        "fastchat_core.eval",
        "fastchat_core.engine",
        "fastchat_core.triton_kernels",
        "fastchat_core.train",
        "fastchat_core.serve",
        "fastchat_core.bench",
    ],
    package_dir={
        "fastchat_core": "fastchat_core",
        "fastchat_core.triton_kernels": "triton_kernels",
        "fastchat_core.train": "train",
        "fastchat_core.serve": "serve",
        "fastchat_core.bench": "bench",
    },
    package_data={"fastchat_core.serve": ["*.html"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=[
        "torch>=2.5",  # SDPA enable_gqa
        "numpy<2.4",  # triton 3.6's interpreter breaks on numpy 2.4 loops with run-time bounds
        "tokenizers>=0.19",
        "pyarrow",
        "regex",
        "triton==3.6.0; platform_system == 'Linux'",  # kernels on CUDA; its interpreter runs them in CPU tests
        "uvicorn",
        "starlette",
    ],
    extras_require={
        "test": ["pytest", "uvicorn", "starlette", "httpx", "websockets", "matplotlib", "wandb", "openai"],
    },
    entry_points={"console_scripts": ["fastchat = fastchat_core.cli:main"]},
)
