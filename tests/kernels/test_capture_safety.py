"""The captured decode step on the Triton functions reads no device value on the host.

A CUDA graph records kernels, not Python: a host read of device data during capture (``.item()``,
``bool(t)``, ``nonzero``, a boolean mask, a copy to the CPU) fails the capture or bakes one
step's values into every replay. The host side of the Triton LoRA backend and attention (tables,
tiles, grids, allocations) must therefore only look at shapes, strides and addresses. Here the
kernel launches are replaced by no-ops (the host code is what is under test; the kernels are
tested elsewhere) and every aten op of the step body passes through a dispatch mode that fails on
the ops that read device memory on the host. (``tolist()`` and ``numpy()`` of a CPU tensor do not
pass through the dispatcher; none is used by this host code, and the torch path's FakeTensorMode
test in ``tests/engine/test_decode_graphs.py`` catches them there.)
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import dummy_engine_factory
from loraplex_server.engine import engine as engine_module
from loraplex_server.lora import manager as manager_module
from loraplex_server.lora import triton_ops
from loraplex_server.model import triton_attention

aten = torch.ops.aten
HOST_READS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.unique_consecutive,
              aten._unique2, aten.repeat_interleave}


class HostReadError(AssertionError):
    pass


class FailOnHostReads(TorchDispatchMode):
    """Raises on every aten op that needs device data on the host; records what ran."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append(str(func))
        if func.overloadpacket in HOST_READS:
            raise HostReadError(f"host read of device data: {func}")
        if func.overloadpacket is aten._to_copy and kwargs.get("device") == torch.device("cpu"):
            raise HostReadError(f"copy to the host: {func}")
        if func.overloadpacket in (aten.index, aten.index_put, aten.index_put_):
            indices = args[1] if len(args) > 1 else []
            if any(t is not None and t.dtype == torch.bool for t in indices):
                raise HostReadError(f"boolean mask index: {func}")
        return func(*args, **kwargs)


class NoLaunch:
    """Stands in for a jitted kernel: ``kernel[grid](*args)`` counts the launch and does nothing."""

    def __init__(self, launches: list[str], name: str):
        self.launches, self.name = launches, name

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(self.name)


@pytest.fixture
def triton_graphs(tmp_path, device, monkeypatch):
    """Decode steps (eager emulation, no GPU needed) of an engine on the Triton functions, with
    the kernel launches replaced by counting no-ops; returns (graphs, launches)."""
    monkeypatch.setattr(manager_module, "apply_function", lambda device, native=None: triton_ops.TritonLoraBackend())
    monkeypatch.setattr(engine_module, "select_attention_function", lambda device: triton_attention.triton_paged_attention)
    engine = dummy_engine_factory(tmp_path, torch.device("cpu"), max_model_len=64)(cuda_graphs="on",
                                                                                   cuda_graph_max_batch=4)
    launches: list[str] = []
    for module, name in ((triton_ops, "bgmv_shrink_kernel"), (triton_ops, "bgmv_expand_kernel"),
                         (triton_ops, "sgmv_shrink_kernel"), (triton_ops, "sgmv_expand_kernel"),
                         (triton_attention, "_paged_attention_kernel")):
        monkeypatch.setattr(module, name, NoLaunch(launches, name))
    return engine.runner.decode_graphs, launches


@pytest.mark.parametrize("with_lora", [False, True])
def test_triton_step_body_reads_nothing_on_the_host(triton_graphs, with_lora):
    graphs, launches = triton_graphs
    forward = graphs._forward_fn(4, with_lora)
    with torch.inference_mode(), FailOnHostReads() as mode:
        logits = forward()
    assert logits.shape == (4, 49152) and mode.ops
    layers = 2
    assert launches.count("_paged_attention_kernel") == layers
    if with_lora:  # per layer: shrinks for q/k/v, o, gate/up, down; an expand per projection
        assert launches.count("bgmv_shrink_kernel") == 4 * layers
        assert launches.count("bgmv_expand_kernel") == 7 * layers
        assert not any(name.startswith("sgmv") for name in launches)
    else:
        assert not any("shrink" in name or "expand" in name for name in launches)


@pytest.mark.parametrize("read", [
    lambda t: int(t.sum()),
    lambda t: t[t > 0],
    lambda t: t.nonzero(),
    lambda t: t.repeat_interleave(t),  # an output shape that depends on the values
])
def test_the_detector_catches_host_reads(read):
    t = torch.arange(6)
    with pytest.raises(HostReadError), FailOnHostReads():
        read(t)
