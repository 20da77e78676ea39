"""Per-step int tensors through numpy (host_tensors.py) equal what torch.tensor builds from the lists."""

import random

import pytest
import torch

from loraplex_server.host_tensors import int_tensor, padded_rows


@pytest.mark.parametrize("dtype", [torch.long, torch.int32])
def test_int_tensor_equals_torch_tensor(dtype):
    values = [0, 1, 2**31 - 1, 7, -1] if dtype is torch.int32 else [0, 2**40, -5, 3]
    built = int_tensor(values, dtype, "cpu")
    assert built.dtype is dtype and torch.equal(built, torch.tensor(values, dtype=dtype))
    assert int_tensor([], dtype, "cpu").shape == (0,)


@pytest.mark.parametrize("dtype", [torch.long, torch.int32])
def test_padded_rows_equal_rows_padded_with_zeros(dtype):
    rng = random.Random(0)
    for _ in range(50):
        rows = [[rng.randrange(1, 10_000) for _ in range(rng.randrange(0, 9))] for _ in range(rng.randrange(1, 40))]
        width = max(len(r) for r in rows)
        expected = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=dtype).reshape(len(rows), width)
        built = padded_rows(rows, dtype, "cpu")
        assert built.dtype is dtype and torch.equal(built, expected)
    assert padded_rows([], dtype, "cpu").shape == (0, 0)
