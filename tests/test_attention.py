"""The attention registry: built-ins, custom functions, masks, and clear errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fmodel
from fmodel import attention

from .conftest import make_hf_model, padded_batch, requires_transformers


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model = make_hf_model("llama")
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder)
    return fmodel.load(folder), model


@pytest.fixture
def registered():
    names = []

    def register(name, fn, **kw):
        attention.register(name, fn, **kw)
        names.append(name)

    yield register
    for name in names:
        attention.unregister(name)


def test_builtins_are_available_on_cpu():
    assert {"eager", "sdpa", "flex_attention"} <= set(attention.available())


@requires_transformers
def test_a_transformers_attention_function_registers_unchanged(llama, registered):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import eager_attention_forward

    state, _ = llama
    ids, mask = padded_batch()
    reference = fmodel.forward(state, ids, attention_mask=mask, attn_implementation="eager").logits
    registered("hf_eager", eager_attention_forward)  # additive mask, as Transformers' eager expects
    registered("hf_sdpa", sdpa_attention_forward, mask_kind="bool")
    keep = mask.bool()
    for name in ("hf_eager", "hf_sdpa"):
        logits = fmodel.forward(fmodel.set_attn_implementation(state, name), ids, attention_mask=mask).logits
        assert (logits - reference)[keep].abs().max().item() <= 1e-5


def test_custom_function_always_receives_the_mask(llama, registered):
    state, _ = llama
    seen = []

    def spy(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        seen.append(attention_mask)
        return attention.eager_attention(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout
        )

    registered("spy", spy)
    ids, mask = padded_batch()
    fmodel.forward(state, ids, attention_mask=mask, attn_implementation="spy")
    assert len(seen) == state.config.num_hidden_layers
    m = seen[0]
    assert m is not None and m.shape == (2, 1, ids.shape[1], ids.shape[1]) and m.dtype == torch.float32
    # row 0 is left-padded by 3: nothing may attend to its first 3 keys; the causal part is masked too
    assert (m[0, 0, :, :3] == torch.finfo(torch.float32).min).all()
    assert m[1, 0, 5, 6] == torch.finfo(torch.float32).min and m[1, 0, 6, 5] == 0
    # even without padding a custom function gets the causal mask (Transformers passes None)
    seen.clear()
    fmodel.forward(state, ids, attn_implementation="spy")
    assert seen[0] is not None and seen[0][0, 0, 0, 1] == torch.finfo(torch.float32).min


def test_switching_attention_rebuilds_nothing(llama):
    from fmodel.models.skeleton import skeleton

    state, _ = llama
    before = skeleton(state.config, state.architecture)
    eager = fmodel.set_attn_implementation(state, "eager")
    fmodel.forward(eager, torch.tensor([[1, 2, 3]]))
    assert skeleton(eager.config, eager.architecture) is before
    assert state.attn_implementation == "sdpa" and eager.attn_implementation == "eager"


def test_unknown_attention_is_a_clear_error(llama):
    state, _ = llama
    with pytest.raises(fmodel.AttentionUnavailableError, match=r"'nope' is not registered.*eager"):
        fmodel.set_attn_implementation(state, "nope")
    with pytest.raises(fmodel.AttentionUnavailableError, match="nope"):
        fmodel.forward(state, torch.tensor([[1, 2]]), attn_implementation="nope")


@pytest.mark.parametrize(
    "name, package", [("flash_attention_2", "flash_attn"), ("flash_attention_3", "flash_attn_interface")]
)
def test_flash_attention_says_what_is_missing(llama, name, package):
    if importlib.util.find_spec(package) is not None and torch.cuda.is_available():
        pytest.skip(f"{package} and a GPU are present: {name} runs here")
    state, _ = llama
    with pytest.raises(fmodel.AttentionUnavailableError, match=rf"{name}.*(not installed|CUDA GPU)"):
        fmodel.set_attn_implementation(state, name)
    assert name not in attention.available()


@pytest.mark.parametrize(
    "fn, package, dropout",
    [("flash_attention", "flash_attn", 0.1), ("flash_attention_3", "flash_attn_interface", 0.0)],
)
def test_flash_entries_call_their_package_kernels(monkeypatch, fn, package, dropout):
    """Each flash entry imports its own package's kernels when called and hands them the
    arguments; FlashAttention 3 runs without dropout (its kernels take none)."""
    import sys
    from types import ModuleType, SimpleNamespace

    from fmodel.attention import builtin

    seen = {}

    def dense(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0):
        seen.update(dropout_p=dropout_p, softmax_scale=softmax_scale, window=window_size, softcap=softcap)
        return q

    fake = ModuleType(package)
    fake.flash_attn_func, fake.flash_attn_varlen_func = dense, dense
    monkeypatch.setitem(sys.modules, package, fake)
    entry = getattr(builtin, fn)
    assert entry.__name__ == fn and builtin.takes_softcap(entry)
    q = torch.randn(1, 2, 3, 4)
    out, weights = entry(SimpleNamespace(is_causal=True), q, q, q, None, 0.5, 0.1, 2, 1.5)
    assert weights is None and torch.equal(out, q.transpose(1, 2))
    assert seen == {"dropout_p": dropout, "softmax_scale": 0.5, "window": (1, 0), "softcap": 1.5}


def test_register_validates_its_arguments():
    with pytest.raises(ValueError, match="mask_kind"):
        attention.register("x", lambda *a, **k: None, mask_kind="dense")
    with pytest.raises(TypeError, match="callable"):
        attention.register("x", 42)


def test_every_mask_form_gives_the_same_attention():
    from types import SimpleNamespace

    from fmodel.attention import MaskInputs, build_mask

    pad = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0]])
    inputs = MaskInputs(pad, torch.arange(8), 8, 2)
    module = SimpleNamespace(num_key_value_groups=2, training=False, is_causal=True)
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 4, 8, 16, generator=g),
        torch.randn(2, 2, 8, 16, generator=g),
        torch.randn(2, 2, 8, 16, generator=g),
    )
    real = pad.bool()[:, :, None]  # compare real query rows only
    for window in (None, 3):
        allowed = build_mask("bool", inputs, window, torch.float32)
        additive = build_mask("additive", inputs, window, torch.float32)
        assert torch.equal(allowed, additive == 0)
        eager, _ = attention.eager_attention(module, q, k, v, additive, scaling=0.25)
        sdpa, _ = attention.sdpa_attention(module, q, k, v, allowed, scaling=0.25)
        flex, _ = attention.flex_attention(
            module, q, k, v, build_mask("block", inputs, window, torch.float32), scaling=0.25
        )
        for other in (sdpa, flex):
            assert ((other - eager).abs() * real[..., None]).max() <= 1e-5
    assert build_mask("bool", MaskInputs(None, torch.arange(8), 8, 2), None, torch.float32) is None


@settings(max_examples=40, deadline=None)
@given(
    kv_heads=st.integers(1, 3),
    groups=st.integers(2, 4),
    t=st.integers(1, 5),
    extra_keys=st.integers(0, 6),
    per_head=st.booleans(),
    boolean=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_sdpa_grouped_query_attention_equals_repeated_keys(kv_heads, groups, t, extra_keys, per_head, boolean, seed):
    """sdpa with a mask over grouped key/value heads (the query heads folded into the rows, no
    repeat_kv copy of the cache) equals sdpa over the repeated keys/values."""
    from types import SimpleNamespace

    from fmodel.attention.builtin import repeat_kv, sdpa_attention

    gen = torch.Generator().manual_seed(seed)
    b, d, s = 2, 8, t + extra_keys
    h = kv_heads * groups
    q = torch.randn(b, h, t, d, generator=gen)
    k, v = torch.randn(b, kv_heads, s, d, generator=gen), torch.randn(b, kv_heads, s, d, generator=gen)
    keep = torch.rand(b, h if per_head else 1, t, s + 3, generator=gen) > 0.3
    keep[..., 0] = True  # every row sees a key
    mask = keep if boolean else torch.where(keep, 0.0, torch.finfo(torch.float32).min)
    module = SimpleNamespace(num_key_value_groups=groups, is_causal=True)
    got, _ = sdpa_attention(module, q, k, v, mask, scaling=0.3)
    want = F.scaled_dot_product_attention(
        q, repeat_kv(k, groups), repeat_kv(v, groups), attn_mask=mask[..., :s], scale=0.3
    ).transpose(1, 2)
    assert got.shape == (b, t, h, d)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
