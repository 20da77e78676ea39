"""The native greedy argmax (model/csrc/argmax.cpp) gives torch.argmax(dim=1)'s answer."""

import pytest
import torch

from loraplex_server.engine.sampler import Sampler


@pytest.mark.parametrize("rows,cols", [(1, 1), (1, 49152), (7, 33), (64, 1000), (3, 17)])
def test_matches_torch_on_random_rows(rows, cols, native_kernels):
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows * cols))
    assert torch.equal(native_kernels.argmax(x), x.argmax(dim=1))


SPECIAL = [
    [1.0, 3.0, 3.0, 2.0],                     # tie: first maximum
    [float("-inf")] * 4,                      # all -inf: index 0
    [0.0, float("nan"), 5.0, float("nan")],   # NaN is the maximum: first NaN
    [1.0, float("inf"), 2.0, float("inf")],   # +inf tie
    [-2.0, -1.0, -3.0, -1.0],
]


def test_ties_nan_and_infinities_as_torch(native_kernels):
    x = torch.tensor(SPECIAL)
    assert native_kernels.argmax(x).tolist() == x.argmax(dim=1).tolist() == [1, 0, 1, 1, 1]


@pytest.mark.parametrize("placed", [
    {511: 9.0}, {512: 9.0}, {0: 9.0, 1999: 9.0},                  # chunk edges; tie across chunks
    {700: 9.0, 1500: 9.0, 100: 8.0},                               # tie in two later chunks
    {100: 9.0, 1500: float("nan")},                                # NaN in a later chunk still wins
    {1500: float("nan"), 1600: float("nan"), 3: float("inf")},     # first NaN, after an inf
    {1999: float("inf")}, {1024: -1.0},                            # last column; max in a middle chunk
])
def test_chunk_boundaries_ties_and_nan_across_chunks(placed, native_kernels):
    """The kernel reads rows in 512-column chunks: answers across chunk edges are torch's."""
    x = torch.full((3, 2000), -5.0)
    x[1] = float("-inf")  # all -inf but the placed values
    x[2] = torch.randn(2000, generator=torch.Generator().manual_seed(7)) - 10.0
    for col, value in placed.items():
        x[:, col] = value
    assert torch.equal(native_kernels.argmax(x), x.argmax(dim=1))


def test_strided_rows_and_refusals(native_kernels):
    x = torch.randn(6, 40)[::2, :30]  # row stride 80, unit column stride
    assert torch.equal(native_kernels.argmax(x), x.argmax(dim=1))
    with pytest.raises(ValueError, match="fp32"):
        native_kernels.argmax(torch.randn(2, 5).bfloat16())
    with pytest.raises(ValueError, match="unit stride"):
        native_kernels.argmax(torch.randn(5, 2).t())


def test_sampler_uses_it_for_greedy_and_sampled_rows(native_kernels):
    from loraplex_server.engine.request import Request, SamplingParams

    calls = []
    sampler = Sampler(torch.device("cpu"))
    sampler.fast_argmax = lambda logits: calls.append(logits.shape) or native_kernels.argmax(logits)
    greedy = Request("g", [1, 2], SamplingParams())
    logits = torch.randn(1, 100)
    assert sampler(logits, [greedy]).token_ids == [int(logits.argmax())]
    assert calls == [(1, 100)]
    penalised = Request("p", [1, 2], SamplingParams(repetition_penalty=1.2))  # off the plain fast path
    logits = torch.randn(2, 100)
    assert sampler(logits, [greedy, penalised]).token_ids[0] == int(logits[0].argmax())
    assert calls[-1] == (2, 100)
