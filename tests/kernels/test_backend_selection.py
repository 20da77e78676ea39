"""Which LoRA apply and attention function a model gets: the Triton kernels on a CUDA device when
triton imports, the torch functions otherwise (CPU, or no triton). The kernel modules import
without triton; triton itself must be installed where these tests run."""

import importlib.util
import sys

import pytest
import torch

from loraplex_server.lora import ops, triton_ops
from loraplex_server.model import triton_attention
from loraplex_server.model.attention import paged_attention


def test_triton_is_installed():
    import triton  # noqa: F401  (CI installs it; a missing triton must fail here, not skip)

    assert triton_ops.triton_available() and triton_attention.triton_available()


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_cpu_falls_back_to_the_torch_functions(device):
    assert triton_ops.select_lora_backend(device) is None
    assert ops.apply_function(device) is ops.lora_apply
    assert triton_attention.select_attention_function(device) is paged_attention


@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda", 0)])
def test_cuda_gets_the_triton_kernels(device):
    """Selection looks at the device type only, so a ``cuda`` device object needs no GPU here."""
    apply = ops.apply_function(device)
    assert isinstance(apply, triton_ops.TritonLoraBackend)
    assert ops.apply_function(device) is not apply  # one backend per model: its step caches are its own
    assert triton_attention.select_attention_function(device) is triton_attention.triton_paged_attention


def test_cuda_without_triton_falls_back(monkeypatch):
    monkeypatch.setattr(triton_ops, "triton_available", lambda: False)
    monkeypatch.setattr(triton_attention, "triton_available", lambda: False)
    assert ops.apply_function("cuda") is ops.lora_apply
    assert triton_attention.select_attention_function("cuda") is paged_attention


def _fresh_copy(module_name: str, monkeypatch):
    """Execute a module's file again as a new module object, which imports later in this test
    resolve to (sys.modules gets the real one back afterwards)."""
    spec = importlib.util.find_spec(module_name)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, module_name, module)
    spec.loader.exec_module(module)
    return module


def test_modules_import_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    common = _fresh_copy("loraplex_server.triton_common", monkeypatch)
    _fresh_copy("loraplex_server.lora.triton_kernels", monkeypatch)  # jit helpers from the fresh common
    host = _fresh_copy("loraplex_server.lora.triton_ops", monkeypatch)  # imports the fresh kernels
    lora_ops = _fresh_copy("loraplex_server.lora.ops", monkeypatch)
    attention = _fresh_copy("loraplex_server.model.triton_attention", monkeypatch)
    assert not common.triton_available() and not host.triton_available() and not attention.triton_available()
    assert host.select_lora_backend("cuda") is None
    assert lora_ops.apply_function("cuda") is lora_ops.lora_apply
    assert attention.select_attention_function("cuda") is paged_attention
