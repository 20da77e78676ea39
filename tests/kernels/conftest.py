"""Kernel tests: on CUDA when a GPU is present, else on CPU tensors under the Triton interpreter.

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a kernel, i.e. when our kernel modules
are imported. The engine imports them (through ``lora.ops`` and ``model.triton_attention``) before
this file runs, so it is set here and the kernel modules are reloaded in place: the shared jit
helpers first, then the kernels, then the host modules that took names from them. triton itself is required: CI installs it.
"""

import importlib
import os
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in ("loraplex_server.triton_common", "loraplex_server.lora.triton_kernels",
                  "loraplex_server.lora.triton_ops",
                  "loraplex_server.model.triton_attention"):
        if _name in sys.modules:
            importlib.reload(sys.modules[_name])


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if ON_GPU else "cpu")


@pytest.fixture(scope="session")
def native_kernels(tmp_path_factory):
    """The native CPU kernels, built into a fresh cache directory (2 threads, so splits are tested)."""
    from loraplex_server.model import native

    built = native.load_native_kernels(tmp_path_factory.mktemp("kernels"), threads=2)
    assert built is not None, "the C++ compiler on this machine should build the kernels"
    return built
