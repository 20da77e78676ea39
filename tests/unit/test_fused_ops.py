"""Native fused RMSNorm and gated SiLU (model/fused_ops.py) against transformers' own modules."""

import pytest
import torch
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
from transformers import LlamaConfig

from loraplex_server.model import native
from loraplex_server.model.fused_ops import install_fused_ops

# bf16: the kernel keeps the modules' roundings; its fp32 sum of squares may round differently
# from torch's mean (1 bf16 ulp at most on a few elements); fp32: reduction order and exp ulps.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 8e-3)}


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    built = native.load_native_kernels(tmp_path_factory.mktemp("kernels"), threads=2)
    assert built is not None, "the C++ compiler on this machine should build the kernels"
    return built


def _mlp(dtype, act="silu"):
    config = LlamaConfig(hidden_size=96, intermediate_size=200, hidden_act=act)
    torch.manual_seed(0)
    mlp = LlamaMLP(config).to(dtype)
    for p in mlp.parameters():
        nn.init.normal_(p, std=0.1)
    return mlp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 700])  # 700 rows x 96: above the parallel threshold
def test_norm_and_mlp_match_the_modules(dtype, rows, kernels):
    norm, qwen_norm = LlamaRMSNorm(96, eps=1e-5).to(dtype), Qwen2RMSNorm(96).to(dtype)
    for n in (norm, qwen_norm):
        nn.init.normal_(n.weight, mean=1.0, std=0.2)
    mlp = _mlp(dtype)
    x = (torch.randn(1, rows, 96) * 3).to(dtype)
    expected = [m(x) for m in (norm, qwen_norm, mlp)]
    container = nn.ModuleList([norm, qwen_norm, mlp])
    assert install_fused_ops(container, kernels) == 3
    atol, rtol = TOL[dtype]
    for module, want in zip((norm, qwen_norm, mlp), expected):
        got = module(x)
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)


def test_strided_rows_and_a_silu_tail(kernels):
    """Inputs that are views (a unit last stride, rows apart) and sizes with a non-vector tail."""
    norm = LlamaRMSNorm(37)
    nn.init.normal_(norm.weight, mean=1.0, std=0.2)
    base = torch.randn(5, 80)
    x = base[:, 3:40]  # rows 80 apart
    want = norm(x)
    got = kernels.rms_norm(x, norm.weight, norm.variance_epsilon)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    gate, up = torch.randn(3, 41) * 20, torch.randn(3, 41)  # large |gate|: exp over/underflow paths
    torch.testing.assert_close(kernels.silu_mul(gate, up), nn.functional.silu(gate) * up, atol=1e-5, rtol=1e-5)


def test_other_forwards_and_dtypes_are_left_alone(kernels):
    gemma = GemmaRMSNorm(64)  # (1 + weight): not Llama's forward
    gelu_mlp = _mlp(torch.float32, act="gelu")
    half_norm = LlamaRMSNorm(64).half()  # no native fp16 variant
    modules = nn.ModuleList([gemma, gelu_mlp, half_norm])
    assert install_fused_ops(modules, kernels) == 0
    assert all("forward" not in vars(m) for m in modules)
    half_mlp = _mlp(torch.float16)  # installed, but fp16 activations take the module's own maths
    x = torch.randn(3, 96).half()
    want = half_mlp(x)
    assert install_fused_ops(half_mlp, kernels) == 1
    assert torch.equal(half_mlp(x), want)


def test_bad_arguments_are_refused(kernels):
    with pytest.raises(ValueError, match="one dtype"):
        kernels.rms_norm(torch.randn(2, 8), torch.ones(8).bfloat16(), 1e-6)
    with pytest.raises(ValueError, match="weight"):
        kernels.rms_norm(torch.randn(2, 8), torch.ones(9), 1e-6)
    with pytest.raises(ValueError, match="differ"):
        kernels.silu_mul(torch.randn(2, 8), torch.randn(2, 9))
    with pytest.raises(ValueError, match="one dtype"):
        kernels.silu_mul(torch.randn(2, 8).half(), torch.randn(2, 8).half())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_llama_forward_matches_transformers(dtype, kernels):
    """A random tiny Llama, logits before and after every norm, MLP and attention (rotary) is fused."""
    from transformers import LlamaForCausalLM

    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, attn_implementation="eager")
    torch.manual_seed(1)
    model = LlamaForCausalLM(config).to(dtype).eval()
    ids = torch.randint(0, 300, (1, 23))
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        assert install_fused_ops(model, kernels) == 2 * 4 + 1  # per layer: 2 norms, MLP, attention; final norm
        layer = model.model.layers[0]
        assert hasattr(layer.self_attn, "merged_q_k_v") and hasattr(layer.mlp, "merged_gate_up")  # one matmul each
        got = model(input_ids=ids, use_cache=False).logits
    atol = 1e-5 if dtype == torch.float32 else 0.1  # bf16: a 1-ulp rounding flip moves later layers
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=0)


def test_rope_matches_apply_rotary_pos_emb(kernels):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    for dtype in (torch.float32, torch.bfloat16):
        q, k = torch.randn(1, 6, 9, 32).to(dtype), torch.randn(1, 2, 9, 32).to(dtype)  # [1, H, T, D]
        angles = torch.randn(1, 9, 32) * 3
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
        q_rows, k_rows = q[0].transpose(0, 1).contiguous(), k[0].transpose(0, 1).contiguous()  # [T, H, D]
        kernels.rope_(q_rows, cos[0], sin[0])
        kernels.rope_(k_rows, cos[0], sin[0])
        assert torch.equal(q_rows, want_q[0].transpose(0, 1)) and torch.equal(k_rows, want_k[0].transpose(0, 1))
    with pytest.raises(ValueError, match="even head size"):
        kernels.rope_(torch.randn(2, 3, 5), torch.randn(2, 5), torch.randn(2, 5))
    with pytest.raises(ValueError, match="cos/sin"):
        kernels.rope_(torch.randn(2, 3, 4), torch.randn(3, 4), torch.randn(3, 4))


def test_fake_tensors_take_the_modules_own_forward(kernels):
    """Under FakeTensorMode (tracing, the captured-step check) there is no data for a kernel to
    read: the fused modules run their own maths instead of crashing the process."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    norm, mlp = LlamaRMSNorm(96), _mlp(torch.float32)
    assert install_fused_ops(nn.ModuleList([norm, mlp]), kernels) == 2
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.randn(1, 5, 96)
        assert mlp(norm(x)).shape == (1, 5, 96)
        with pytest.raises(ValueError, match="CPU tensors"):
            kernels.rms_norm(x, norm.weight, 1e-6)
