"""The reused-memory LM head (model/logits_head.py): F.linear's logits, bit for bit, in one buffer."""

import pytest
import torch
from torch import nn

from loraplex_server.model import logits_head
from loraplex_server.model.logits_head import ReusedLogitsHead, reuse_logits_memory
from loraplex_server.model.packed_linear import PackedLinear, packing_available


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_bits_as_the_plain_head_and_one_buffer_across_steps(dtype):
    torch.manual_seed(0)
    plain = nn.Linear(64, 1000, bias=False).to(dtype)
    head = ReusedLogitsHead(plain)
    pointers = set()
    with torch.inference_mode():
        for rows in (256, 3, 256, 1, 17):  # largest first: every later step fits the same memory
            hidden = torch.randn(1, rows, 64).to(dtype)
            out = head(hidden)
            assert out.shape == (1, rows, 1000) and out.dtype == dtype
            assert torch.equal(out, plain(hidden))
            pointers.add(out.data_ptr())
    assert pointers == {head._buffer.data_ptr()}


def test_grows_for_a_larger_step_and_leaves_training_paths_alone():
    plain = nn.Linear(8, 50, bias=False)
    head = ReusedLogitsHead(plain)
    with torch.inference_mode():
        head(torch.randn(2, 8))
        small = head._buffer
        big = head(torch.randn(9, 8))
    assert head._buffer.shape == (9, 50) and head._buffer is not small and big.data_ptr() == head._buffer.data_ptr()
    x = torch.randn(4, 8, requires_grad=True)
    y = head(x)  # grad enabled: a fresh tensor from the plain head, not the buffer
    assert y.requires_grad and y.data_ptr() != head._buffer.data_ptr()


def test_wraps_only_a_bias_free_cpu_linear_head():
    class Model(nn.Module):
        def __init__(self, head):
            super().__init__()
            self.lm_head = head

        def get_output_embeddings(self):
            return self.lm_head

        def set_output_embeddings(self, head):
            self.lm_head = head

    model = Model(nn.Linear(8, 50, bias=False))
    weight = model.lm_head.weight
    assert reuse_logits_memory(model) and isinstance(model.lm_head, ReusedLogitsHead)
    assert model.lm_head.weight is weight  # tied embeddings stay tied
    assert not reuse_logits_memory(Model(nn.Linear(8, 50, bias=True)))
    with pytest.raises(ValueError, match="bias-free"):
        ReusedLogitsHead(nn.Linear(8, 50))


def test_outside_inference_mode_it_is_the_plain_head():
    """The buffer is made under inference_mode (an inference tensor): a later no_grad call must not
    write into it (torch refuses that), so it takes the plain head."""
    plain = nn.Linear(8, 50, bias=False)
    head = ReusedLogitsHead(plain)
    with torch.inference_mode():
        head(torch.randn(3, 8))
    with torch.no_grad():
        x = torch.randn(3, 8)
        y = head(x)
    assert torch.equal(y, plain(x).detach()) and y.data_ptr() != head._buffer.data_ptr()


@pytest.mark.skipif(not packing_available(torch.float32), reason="oneDNN linear packing unavailable")
def test_a_packed_head_returns_small_logits_fresh_and_writes_large_ones_into_the_buffer_in_chunks(monkeypatch):
    """Below CHUNK_BYTES the packed head's own output (heap-served) is returned; above it, rows go
    through the buffer in chunks of at most CHUNK_BYTES, and every row equals the packed head's."""
    torch.manual_seed(0)
    packed = PackedLinear(nn.Linear(64, 1000, bias=False))
    head = ReusedLogitsHead(packed)
    monkeypatch.setattr(logits_head, "CHUNK_BYTES", 7 * 1000 * 4)  # 7 rows of fp32 logits
    chunk_rows = []
    forward = packed.forward
    monkeypatch.setattr(packed, "forward", lambda x: (chunk_rows.append(x.shape[:-1].numel()), forward(x))[1])
    with torch.inference_mode():
        small = torch.randn(1, 7, 64)
        out = head(small)
        assert head._buffer is None and chunk_rows == [7]  # one call, its own output
        torch.testing.assert_close(out, forward(small), rtol=0, atol=0)
        chunk_rows.clear()
        big = torch.randn(1, 17, 64)
        out = head(big)
        assert chunk_rows == [7, 7, 3] and out.data_ptr() == head._buffer.data_ptr()
        assert out.shape == (1, 17, 1000)
        for start in (0, 7, 14):  # each chunk as the packed head computes those rows alone
            rows = big[:, start:start + 7]
            assert torch.equal(out[:, start:start + 7], forward(rows.reshape(-1, 64)).view(1, -1, 1000))
    with pytest.raises(AttributeError):
        _ = head.weight  # only the packed weight exists


@pytest.mark.skipif(not packing_available(torch.float32), reason="oneDNN linear packing unavailable")
def test_reuse_logits_memory_wraps_a_packed_head():
    model = nn.Module()
    model.lm_head = PackedLinear(nn.Linear(8, 50, bias=False))
    model.get_output_embeddings = lambda: model.lm_head
    model.set_output_embeddings = lambda head: setattr(model, "lm_head", head)
    assert reuse_logits_memory(model) and isinstance(model.lm_head, ReusedLogitsHead)
    assert isinstance(model.lm_head.head, PackedLinear)
