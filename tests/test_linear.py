"""fmodel.models.linear.Linear: nn.Linear whose CPU decode steps (float32 / bfloat16, at most
KERNEL_MAX_ROWS rows) run fmodel.kernels.dense_linear, or oneDNN over a packed bfloat16 weight
without the extension, and whose float32 prefill runs oneDNN's product on the stored weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fmodel
from fmodel.models import linear as linear_module
from fmodel.models.cpu_kernels import KERNEL_MAX_ROWS
from fmodel.models.linear import Linear

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
needs_kernels = pytest.mark.skipif(linear_module._kernels() is None, reason="fmodel.kernels could not be built here")


@pytest.fixture
def no_kernels(monkeypatch):
    """The extension unavailable: bfloat16 decode steps take the packed oneDNN path."""
    monkeypatch.setattr(linear_module, "_kernels", lambda: None)


def _layer(in_features: int, out_features: int, bias: bool, dtype=torch.bfloat16, seed: int = 0) -> Linear:
    torch.manual_seed(seed)
    layer = Linear(in_features, out_features, bias=bias).to(dtype)
    layer.requires_grad_(False)
    return layer


# a layer and its input: decode-sized and prefill-sized rows, odd widths, 2-D or 3-D
_SHAPES = dict(
    rows=st.integers(1, 2 * KERNEL_MAX_ROWS),
    in_features=st.integers(1, 70),
    out_features=st.integers(1, 70),
    bias=st.booleans(),
    three_d=st.booleans(),
    seed=st.integers(0, 2**16),
)


def _within_float32_accumulation(got: torch.Tensor, layer: Linear, x: torch.Tensor) -> None:
    """`got` is x @ W.T + b accumulated in float32 and rounded once to x's dtype: against the
    float64 product, at most K * 2**-24 * sum |w x| (summation order) plus one ulp of the
    output dtype (the rounding)."""
    w64, x64 = layer.weight.double(), x.double()
    ref = F.linear(x64, w64, None if layer.bias is None else layer.bias.double())
    slack = layer.in_features * 2.0**-24 * F.linear(x64.abs(), w64.abs()) + 1e-30
    ulp = 2.0 ** (torch.frexp(ref.abs() + slack)[1].double() - (8 if x.dtype == torch.bfloat16 else 24))
    assert bool(((got.double() - ref).abs() <= slack + ulp).all())


@needs_kernels
@settings(max_examples=25, deadline=None)
@given(**_SHAPES, bf16=st.booleans())
def test_inference_rows_are_within_float32_accumulation_of_the_exact_product(
    rows, in_features, out_features, bias, three_d, bf16, seed
):
    """Decode rows (the dense kernel, either dtype) and float32 prefill rows (oneDNN) are the
    exact product up to float32 summation order; bfloat16 prefill is F.linear itself."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    layer = _layer(in_features, out_features, bias, dtype=dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=gen).to(dtype)
    if three_d:
        x = x[None]
    with torch.inference_mode():
        got = layer(x)
    assert got.dtype == dtype and got.shape == (*x.shape[:-1], out_features)
    if rows > KERNEL_MAX_ROWS and bf16:  # bfloat16 prefill: F.linear itself
        assert torch.equal(got, F.linear(x, layer.weight, layer.bias))
    else:
        _within_float32_accumulation(got, layer, x)


@needs_kernels
def test_decode_rows_call_the_kernel_and_longer_inputs_do_not(monkeypatch):
    calls = []
    kernels = linear_module._kernels()
    real = kernels.dense_linear
    monkeypatch.setattr(kernels, "dense_linear", lambda x, w: calls.append(x.shape) or real(x, w))
    with torch.inference_mode():
        _layer(32, 24, bias=True, dtype=torch.float32)(torch.randn(2, 1, 32))
        assert calls == [(2, 32)]  # float32 decode rows: the kernel too
        layer = _layer(32, 24, bias=True)
        layer(torch.randn(KERNEL_MAX_ROWS + 1, 32).bfloat16())
        _layer(32, 24, bias=True, dtype=torch.float32)(torch.randn(KERNEL_MAX_ROWS + 1, 32))
        assert calls == [(2, 32)]  # prefill-sized: not the kernel
        layer(torch.randn(3, 32).bfloat16())
    assert calls == [(2, 32), (3, 32)]


@needs_onednn
@settings(max_examples=25, deadline=None)
@given(**_SHAPES)
def test_without_kernels_bfloat16_forward_is_f_linear_bit_for_bit(rows, in_features, out_features, bias, three_d, seed):
    layer = _layer(in_features, out_features, bias, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=gen).bfloat16()
    if three_d:
        x = x[None]
    with pytest.MonkeyPatch.context() as mp, torch.inference_mode():
        mp.setattr(linear_module, "_kernels", lambda: None)
        got = layer(x)
    assert torch.equal(got, F.linear(x, layer.weight, layer.bias))
    assert got.dtype == torch.bfloat16 and got.shape == (*x.shape[:-1], out_features)


@needs_onednn
def test_without_kernels_decode_rows_use_a_packed_weight_and_longer_inputs_do_not(no_kernels):
    layer = _layer(32, 24, bias=True)
    packs = linear_module._BF16_PACKS
    before = len(packs)
    with torch.inference_mode():
        layer(torch.randn(KERNEL_MAX_ROWS + 1, 32).bfloat16())
        assert len(packs) == before  # prefill-sized: plain F.linear, nothing packed
        layer(torch.randn(1, 32).bfloat16())
    assert len(packs) == before + 1
    del layer  # the packed copy dies with its weight
    assert len(packs) == before


@needs_onednn
def test_without_kernels_in_place_write_to_the_weight_repacks(no_kernels):
    layer = _layer(16, 8, bias=False)
    x = torch.randn(1, 16).bfloat16()
    with torch.no_grad():
        first = layer(x)
        layer.weight.mul_(2)
        second = layer(x)
    assert torch.equal(second, F.linear(x, layer.weight))
    assert not torch.equal(first, second)


def test_gradients_reach_a_trainable_bfloat16_weight():
    layer = Linear(16, 8).bfloat16()
    reference = nn.Linear(16, 8).bfloat16()
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(1, 16).bfloat16()
    layer(x).float().sum().backward()
    reference(x).float().sum().backward()
    assert layer.weight.grad is not None and torch.equal(layer.weight.grad, reference.weight.grad)
    assert torch.equal(layer.bias.grad, reference.bias.grad)


@needs_onednn
def test_float32_prefill_runs_onednn_without_a_packed_copy_and_trains_through_f_linear():
    layer = Linear(40, 24)
    x = torch.randn(2, KERNEL_MAX_ROWS + 3, 40)
    packs = len(linear_module._BF16_PACKS)
    with torch.no_grad():
        got = layer(x)
    assert torch.equal(got, torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "none", [], ""))
    _within_float32_accumulation(got, layer, x)
    assert len(linear_module._BF16_PACKS) == packs  # the stored weight itself: nothing packed
    trained = layer(x)  # gradients wanted: F.linear, and they reach the weight
    assert torch.equal(trained, F.linear(x, layer.weight, layer.bias))
    trained.sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.shape == layer.weight.shape


def test_bfloat16_prefill_rows_and_vmap_run_plain_f_linear():
    layer = _layer(16, 8, bias=True)
    x = torch.randn(3, KERNEL_MAX_ROWS + 1, 16).bfloat16()
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    bf16 = _layer(16, 8, bias=True)
    xs = torch.randn(3, 1, 16).bfloat16()
    batched = torch.func.vmap(bf16)(xs)  # inside vmap the input is functorch-wrapped: plain path
    assert torch.equal(batched, torch.func.vmap(lambda x: F.linear(x, bf16.weight, bf16.bias))(xs))


def test_is_an_nn_linear_with_its_names():
    layer = Linear(4, 3)
    assert isinstance(layer, nn.Linear)
    assert set(layer.state_dict()) == {"weight", "bias"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generate_is_pure_and_equals_the_plain_path(monkeypatch, dtype):
    config = fmodel.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )
    state = fmodel.to(fmodel.init(config, architecture="LlamaForCausalLM", seed=3), dtype=dtype)
    stamps = {name: (t.data_ptr(), t._version, t.clone()) for name, t in state.params.items()}
    ids = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(0))
    no_eos = fmodel.GenerationConfig()
    fast = fmodel.generate(state, ids, max_new_tokens=12, generation_config=no_eos)
    monkeypatch.setattr(linear_module, "_kernels", lambda: None)
    monkeypatch.setattr(linear_module, "_HAS_ONEDNN", False)  # every call through F.linear
    plain = fmodel.generate(state, ids, max_new_tokens=12, generation_config=no_eos)
    assert torch.equal(fast, plain)
    for name, t in state.params.items():
        ptr, version, copy = stamps[name]
        assert t.data_ptr() == ptr and t._version == version and torch.equal(t, copy), name


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_compile_traces_the_dense_kernel(dtype):
    """Under torch.compile a decode-sized input traces the `fmodel.dense_linear` op (the pack
    cache is never traced): the compiled forward is
    the kernel's product plus the bias, rounded once."""
    layer = _layer(32, 24, bias=True, dtype=dtype)
    x = torch.randn(1, 32).to(dtype)
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm

    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    kernels = linear_module._kernels()
    with torch.inference_mode():
        want = (kernels.dense_linear(x.float(), layer.weight) + layer.bias.float()).to(dtype)
        assert torch.equal(compiled(x), want)
    assert any("fmodel.dense_linear" in str(n.target) for g in graphs for n in g.graph.nodes)
