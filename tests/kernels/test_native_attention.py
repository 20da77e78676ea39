"""The native CPU decode attention (model/csrc/paged_attention.cpp) against per-sequence SDPA,
through the torch attention function, and its build / fallback behaviour."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from attention_cases import ATTN_TOL, HEADS, MIXES, make_step, sdpa_reference
from kernel_cases import product

from loraplex_server.model import native
from loraplex_server.model.attention import META_KWARG, paged_attention

NATIVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CASES = product(HEADS, (1, 16), (None, 24), NATIVE_DTYPES, ("decode", "mixed", "long"))


@pytest.fixture
def kernels(native_kernels):
    return native_kernels


@pytest.mark.parametrize("heads,block_size,window,dtype,mix", CASES)
def test_decode_rows_match_per_sequence_sdpa(heads, block_size, window, dtype, mix, kernels):
    """Decodes through the kernel, prefill spans through SDPA: the whole step equals the reference."""
    dtype, seqs = NATIVE_DTYPES[dtype], MIXES[mix]
    q, k, v, meta, ctx_slots = make_step(seqs, heads, block_size, dtype, "cpu")
    meta.decode_kernel = kernels
    scale = heads[2] ** -0.5
    ref = sdpa_reference(q, k, v, meta, seqs, ctx_slots, scale, window)
    layer = SimpleNamespace(layer_idx=0, sliding_window=window)
    out, _ = paged_attention(layer, q, k, v, None, scaling=scale, **{META_KWARG: meta})
    atol, rtol = ATTN_TOL[dtype]
    assert out.shape == (1, q.shape[2], heads[0], heads[2]) and out.dtype == dtype
    torch.testing.assert_close(out[0].float(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_same_result_for_any_thread_split(threads, kernels, tmp_path):
    """Rows split over threads (more threads than rows too) give bit-identical outputs."""
    q, k, v, meta, _ = make_step(MIXES["decode"], (6, 2, 48), 16, torch.float32, "cpu", seed=3)
    k_cache, v_cache = meta.kv_caches[0]
    args = (q[0].transpose(0, 1), k_cache, v_cache)
    tail = (meta.decode_rows, meta.decode_ctx_lens, meta.decode_block_tables, 16, 0.3, None)
    one = torch.zeros(q.shape[2], 6, 48)
    kernels.paged_decode(*args, one, *tail)
    split = torch.zeros_like(one)
    native.NativeKernels(kernels.path, threads).paged_decode(*args, split, *tail)
    assert torch.equal(one, split) and one[meta.decode_rows].abs().sum() > 0


def test_kernels_share_torchs_openmp_runtime(kernels):
    """Built by GNU g++ with OpenMP, the library's libgomp is the one torch loaded: one OpenMP
    runtime in the process, so kernel threads are torch's threads, not a second pool."""
    if "-fopenmp" not in native.compiler_flags(native._compiler()):
        pytest.skip("not a GNU compiler: the kernels are built single-threaded")
    maps = Path("/proc/self/maps").read_text()
    runtimes = {line.split()[-1] for line in maps.splitlines() if "libgomp" in line and "/" in line}
    assert str(kernels.path) in maps and len(runtimes) == 1, runtimes


def test_torch_path_when_the_dtype_is_not_native(kernels):
    """fp16 has no native variant: the torch decode path serves it, same result as without a kernel."""
    q, k, v, meta, ctx_slots = make_step(MIXES["decode"], (4, 2, 32), 16, torch.float16, "cpu")
    meta.decode_kernel = kernels
    layer = SimpleNamespace(layer_idx=0, sliding_window=None)
    out, _ = paged_attention(layer, q, k, v, None, scaling=0.2, **{META_KWARG: meta})
    ref = sdpa_reference(q, k, v, meta, MIXES["decode"], ctx_slots, 0.2, None)
    torch.testing.assert_close(out[0].float(), ref, atol=2e-3, rtol=2e-3)


def test_bad_arguments_are_refused_before_the_call(kernels):
    q = torch.zeros(2, 4, 32)
    cache = torch.zeros(32, 2, 32)
    rows, lens, tables = torch.tensor([0, 1]), torch.tensor([3, 3], dtype=torch.int32), torch.zeros(2, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="int64"):
        kernels.paged_decode(q, cache, cache, q.clone(), rows.int(), lens, tables, 16, 1.0, None)
    with pytest.raises(ValueError, match="one dtype"):
        kernels.paged_decode(q, cache.bfloat16(), cache, q.clone(), rows, lens, tables, 16, 1.0, None)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.paged_decode(q, cache[::2], cache[::2], q.clone(), rows, lens, tables, 16, 1.0, None)


def test_library_is_cached_and_rebuilt_only_when_missing(tmp_path, monkeypatch):
    first = native.build_library(tmp_path)
    calls = []
    monkeypatch.setattr(native.subprocess, "run", lambda *a, **k: calls.append(a))
    assert native.build_library(tmp_path) == first and calls == []  # cached: no compiler run
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no staging files left behind


def test_no_compiler_falls_back_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    with caplog.at_level("WARNING"):
        assert native.load_native_kernels(tmp_path) is None
    assert "no C++ compiler" in caplog.text


def test_failed_build_falls_back_and_leaves_nothing(tmp_path, monkeypatch, caplog):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCES", (broken,))
    with caplog.at_level("WARNING"):
        assert native.load_native_kernels(tmp_path / "cache") is None
    assert "failed" in caplog.text
    assert not list((tmp_path / "cache").rglob("*.so"))


def test_engine_uses_the_kernel_on_cpu_unless_off(make_engine):
    assert make_engine().runner.decode_kernel is not None
    assert make_engine(cpu_kernels="off").runner.decode_kernel is None
