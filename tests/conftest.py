"""Shared test set-up.

Without a GPU, Triton kernels run under the interpreter: TRITON_INTERPRET must be set before anything
imports triton, which is why it happens here, at collection time. GPU tests carry @pytest.mark.gpu.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir():
    """The real data root ($FASTCHAT_DATA); tests that need it skip with a clear reason when it is absent."""
    root = os.environ.get("FASTCHAT_DATA")
    if not root or not os.path.isdir(root):
        pytest.skip("FASTCHAT_DATA is not set to the data folder (CI sets it to ../shared/data)")
    return root


def tolerance(dtype):
    """(rtol, atol) for comparing a kernel against a float64 reference, by the kernel's I/O dtype."""
    return {torch.float32: (1e-4, 1e-5), torch.float16: (1e-2, 1e-3), torch.bfloat16: (5e-2, 1e-2)}[dtype]
