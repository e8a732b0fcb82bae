"""GGUF block formats kept quantized (`load(..., quantized=True)`): every kept format's re-layout
against `gguf.quants.dequantize`, the float-order arguments behind it, files that mix formats
(save -> load of the mixed record), the quantized token embedding and the output projection
tied to it, int8 activations, and corrupt or truncated blocks.

The files are written here with `gguf.GGUFWriter` from a tiny random fmodel Llama (hidden 256,
so K-quant super-blocks of 256 fit); formats `gguf.quants` cannot quantize to (the K-quants)
get random blocks with sane float16 scales.
"""

from __future__ import annotations

import json
import logging
import os
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fmodel
from fmodel.errors import CorruptFileError, InvalidArgumentError, QuantizationError
from fmodel.io.gguf import packaged_smollm2_path, read_gguf
from fmodel.io.gguf_quant import KEPT_FORMATS, release_mapped, to_layout
from fmodel.models.cpu_kernels import float32_linear
from fmodel.models.quant_embedding import QuantEmbedding, TiedQuantLinear
from fmodel.models.quant_linear import (
    Int4Linear,
    Int8Linear,
    Layout,
    dequantize_int4,
    dequantize_int8,
    module_layouts,
    quantization_config,
    quantize_activations_q8,
)
from fmodel.models.skeleton import skeleton

from .test_gguf import HAS_GGUF, _gguf_name, _permute, requires_gguf, requires_smollm2

pytestmark = requires_gguf

if HAS_GGUF:
    import gguf
    from gguf import GGMLQuantizationType as Q

FORMATS = sorted(KEPT_FORMATS)
# the dtype of each format's kept scales and zeros: the file's float16 d / m as stored, float32
# for the K-quants' d * sub-scale products (Q4_0: unless -8d overflows float16, see below)
SCALE_DTYPES = {
    **dict.fromkeys(("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"), torch.float16),
    **dict.fromkeys(("Q4_K", "Q5_K", "Q6_K"), torch.float32),
}


def _blocks(qtype_name: str, rows: int, cols: int, rng: np.random.Generator, data=None) -> np.ndarray:
    """Valid blocks of `qtype_name` for a [rows, cols] matrix: gguf's own quantization where it
    has one, else random bits with float16 scales of either sign (d, dmin) that are finite."""
    qtype = Q[qtype_name]
    if qtype_name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        if data is None:
            data = rng.normal(0, 0.05, size=(rows, cols)).astype(np.float32)
        return gguf.quants.quantize(data.astype(np.float32), qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    out = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)

    def f16(n):
        return rng.normal(0, 0.004, size=n).astype(np.float16).view(np.uint8).reshape(n, 2)

    n = out.shape[0]
    if qtype_name in ("Q4_K", "Q5_K"):  # d, dmin first
        out[:, 0:2], out[:, 2:4] = f16(n), f16(n)
    elif qtype_name == "Q6_K":  # d last
        out[:, -2:] = f16(n)
    elif qtype_name == "Q2_K":  # d, dmin last
        out[:, -4:-2], out[:, -2:] = f16(n), f16(n)
    elif qtype_name == "Q3_K":  # d last
        out[:, -2:] = f16(n)
    return out.reshape(rows, cols // block * size)


def _fake_tensor(qtype_name: str, raw: np.ndarray, rows: int, cols: int):
    return types.SimpleNamespace(
        name="blk.0.ffn_up.weight",
        tensor_type=Q[qtype_name],
        shape=np.array([cols, rows], dtype=np.uint64),
        data=raw,
    )


def _dequantized(layout: Layout, parts: dict, cols: int) -> torch.Tensor:
    if layout.scheme == "int4":
        return dequantize_int4(
            parts["weight_int4"], parts["weight_scale"], parts["weight_zero"], cols, layout.group_size
        )
    return dequantize_int8(
        parts["weight_int8"], parts["weight_scale"], parts.get("weight_zero"), layout.group_size
    )


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("name", FORMATS)
def test_every_kept_format_dequantizes_to_gguf_values(name):
    rows, cols = 12, 512
    rng = np.random.default_rng(FORMATS.index(name))
    raw = _blocks(name, rows, cols, rng)
    layout, parts = to_layout(_fake_tensor(name, raw, rows, cols), "x.gguf")
    assert layout == KEPT_FORMATS[name][0]
    assert set(parts) == set(layout.entries())
    assert all(t.is_contiguous() for t in parts.values())
    for key in ("weight_scale", "weight_zero")[: 1 + layout.zero]:
        assert parts[key].dtype == SCALE_DTYPES[name], key
        assert parts[key].shape == (rows, cols // layout.group_size), key
    data = parts["weight_int4" if layout.scheme == "int4" else "weight_int8"]
    assert data.shape == (rows, cols // 2 if layout.scheme == "int4" else cols)
    want = torch.from_numpy(gguf.quants.dequantize(raw, Q[name]).reshape(rows, cols))
    got = _dequantized(layout, parts, cols)
    assert torch.equal(got, want)  # the same numbers
    same_bits = got.view(torch.int32) == want.view(torch.int32)
    if name == "Q4_0":  # only the sign of a zero may differ (d * 0 vs 8d - 8d): see gguf_quant
        assert torch.all(same_bits | (want == 0))
        assert not torch.all(same_bits)  # this data has negative d with q == 8 somewhere
    else:
        assert torch.all(same_bits)


def _with_d(raw: np.ndarray, values: list[float]) -> np.ndarray:
    """Q4_0 blocks `raw` [rows, blocks * 18] with the first blocks' d (bytes 0:2) set to `values`."""
    blocks = raw.copy().reshape(-1, 18)
    for i, v in enumerate(values):
        blocks[i, 0:2] = np.array([v], dtype=np.float16).view(np.uint8)
    return blocks.reshape(raw.shape)


@pytest.mark.parametrize(
    ("d", "dtype"), [(8188.0, torch.float16), (-8188.0, torch.float16), (8192.0, torch.float32)]
)
def test_q4_0_zero_is_float16_unless_it_overflows(d, dtype):
    """Q4_0's zero -8d is exact in float16 up to |d| = 8188 (8 x 8188 = 65504, float16's largest);
    one block with a larger d makes that tensor's scale and zero float32 (the others stay float16),
    still equal to gguf's values."""
    rows, cols = 4, 64
    raw = _with_d(_blocks("Q4_0", rows, cols, np.random.default_rng(5)), [d])
    layout, parts = to_layout(_fake_tensor("Q4_0", raw, rows, cols), "x.gguf")
    assert parts["weight_scale"].dtype == parts["weight_zero"].dtype == dtype
    assert parts["weight_zero"][0, 0].item() == -8 * d
    want = torch.from_numpy(gguf.quants.dequantize(raw, Q.Q4_0).reshape(rows, cols))
    assert torch.equal(_dequantized(layout, parts, cols), want)  # equal numbers (zeros' sign aside)


def test_scale_views_do_not_alias_the_file():
    """A one-block tensor's scale is already contiguous as a view of the mapped bytes: the kept
    tensors are copies all the same (the file's mapping is read-only and may be closed)."""
    raw = _blocks("Q8_0", 1, 32, np.random.default_rng(0))
    _, parts = to_layout(_fake_tensor("Q8_0", raw, 1, 32), "x.gguf")
    for key, t in parts.items():
        assert not np.shares_memory(t.numpy(), raw), key
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), key


def _mapped_kib(path) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and len(parts) >= 5 and ":" in parts[3]:
                inside = len(parts) > 5 and parts[5] == str(path)
            elif inside and parts[0] == "Rss:":
                total += int(parts[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads /proc/self/smaps (Linux)")
def test_release_mapped_drops_the_resident_pages_of_a_copied_tensor(tmp_path):
    """`release_mapped` (called by the GGUF loader once each tensor is copied out) leaves the
    process holding no pages of that tensor's data, and the data reads the same afterwards."""
    path = tmp_path / "blob.bin"
    data = np.random.default_rng(0).integers(0, 256, size=8 << 20, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    mapped = np.memmap(path, mode="r")
    view = mapped[1 << 20 : 5 << 20].reshape(-1, 1024)  # a tensor's view, not at the start
    total = int(view.sum(dtype=np.int64))  # read: its pages are now resident
    assert _mapped_kib(path) >= 4 << 10
    release_mapped(view)
    assert _mapped_kib(path) <= 8  # at most the pages the view shares with its neighbours
    assert int(view.sum(dtype=np.int64)) == total  # mapped again on the next read
    release_mapped(np.zeros(4))  # not mapped: left alone


@requires_smollm2
@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads /proc/self/smaps (Linux)")
def test_a_quantized_load_holds_no_pages_of_the_file():
    """After `_gguf_entries` has copied every tensor of a real file out (the file still mapped),
    the process holds none of its pages: each release also drops what the OS mapped around the
    tensor's reads (Linux's 64 KiB fault-around reaches into the tensor released before: 6 MB
    stayed resident over SmolLM2's 272 tensors)."""
    from fmodel.io.gguf import _gguf_entries

    path = packaged_smollm2_path()
    file = read_gguf(path)
    tensors, _, _ = _gguf_entries(file, None, True)
    assert tensors
    assert _mapped_kib(os.path.realpath(path)) <= 64


def test_float_order_arguments():
    """The orders gguf_quant relies on, checked rather than assumed."""
    # Q4_0: d * (q - 8) == q * d + (-8d) for every finite float16 d and every q in 0..15
    d = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16).to(torch.float32)
    d = d[torch.isfinite(d)][:, None]
    q = torch.arange(16, dtype=torch.float32)[None, :]
    assert torch.equal(d * (q - 8), q * d + d * -8)
    # Q4_K / Q5_K: (d * sc) * q - dmin * m == q * (d * sc) + (-(dmin * m)), 6-bit sc and m
    g = torch.Generator().manual_seed(0)
    dd = torch.randn(4096, 1, generator=g).to(torch.float16).to(torch.float32)
    dmin = torch.randn(4096, 1, generator=g).to(torch.float16).to(torch.float32)
    sc = torch.randint(0, 64, (4096, 1), generator=g).to(torch.float32)
    m = torch.randint(0, 64, (4096, 1), generator=g).to(torch.float32)
    q32 = torch.arange(32, dtype=torch.float32)[None, :]
    scale, dm = dd * sc, dmin * m
    assert torch.equal((scale * q32 - dm).view(torch.int32), (q32 * scale + (-dm)).view(torch.int32))
    # q * (d * sc) is exact in float32 (11 + 6 + 5 significant bits), so one rounding remains and
    # even a fused multiply-add (a compiler's contraction) gives the same numbers: float64 shows it
    fused = (q32.double() * scale.double() - dm.double()).float()
    assert torch.equal(fused, q32 * scale + (-dm))


def test_quantize_activations_q8_rounding():
    """The int8-activation reference: per block of 32, d = max|x| / 127, q = round-half-even(x * (1/d)),
    value q * d; the same numbers as the kernels' own quantization where fmodel.kernels is built."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 96, generator=g) * 3
    x[0, :32] = 0  # an all-zero block stays zero
    x[1, :5] = torch.tensor([127.0, 0.5, 1.5, 2.5, -2.5])  # d = 1: exact halves, ties to even
    x[2, 5] = 1e4  # an outlier block
    got = quantize_activations_q8(x)
    xb = x.double().reshape(5, 3, 32)
    d = (x.reshape(5, 3, 32).abs().amax(-1, keepdim=True) / 127).double()
    inv = torch.where(d == 0, torch.zeros_like(d), (1 / d.float()).double())
    q = np.round((xb.float() * inv.float()).numpy())  # numpy rounds half to even
    assert torch.equal(got.reshape(5, 3, 32), (torch.from_numpy(q).float() * d.float()))
    assert torch.equal(got[0, :32], torch.zeros(32))
    assert got[1, :5].tolist() == [127.0, 0.0, 2.0, 2.0, -2.0]
    ragged = torch.randn(3, 40, generator=g)  # a last block of 8 columns
    padded = quantize_activations_q8(F.pad(ragged, (0, 24)))[:, :40]
    assert torch.equal(quantize_activations_q8(ragged), padded)
    kernels = pytest.importorskip("fmodel.kernels")
    if not kernels.available():
        pytest.skip("fmodel.kernels is not built here")
    qk, dk = kernels.quantize_act(x)
    assert torch.equal((qk.float().reshape(5, 3, 32) * dk[..., None]).reshape(5, 96), got)


@pytest.mark.parametrize("name", ["Q4_1", "Q6_K"])
def test_truncated_or_ragged_blocks_get_named_errors(name):
    rows, cols = 4, 256
    raw = _blocks(name, rows, cols, np.random.default_rng(0))
    with pytest.raises(CorruptFileError, match=r"x\.gguf: tensor 'blk\.0\.ffn_up\.weight' \(" + name):
        to_layout(_fake_tensor(name, raw.reshape(-1)[:-3], rows, cols), "x.gguf")
    with pytest.raises(CorruptFileError, match="blocks of"):
        to_layout(_fake_tensor(name, raw, rows, cols + 16), "x.gguf")


# --------------------------------------------------------------------------- files


def _tiny_state(tied: bool, seed: int = 0) -> fmodel.ModelState:
    config = fmodel.LlamaConfig(
        vocab_size=64,
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return fmodel.init(config, architecture="LlamaForCausalLM", seed=seed)


def _write_mixed(path, state: fmodel.ModelState, formats: dict[str, str], seed: int = 0) -> str:
    """`state` as llama.cpp's converter writes it (q/k rows permuted), each 2-D tensor in
    `formats[gguf name]` (default F32), 1-D ones in F32."""
    cfg = state.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.context_length", cfg.max_position_embeddings)
    w.add_uint32("llama.embedding_length", cfg.hidden_size)
    w.add_uint32("llama.block_count", cfg.num_hidden_layers)
    w.add_uint32("llama.feed_forward_length", cfg.intermediate_size)
    w.add_uint32("llama.attention.head_count", cfg.num_attention_heads)
    w.add_uint32("llama.attention.head_count_kv", cfg.num_key_value_heads)
    w.add_uint32("llama.rope.dimension_count", cfg.hidden_size // cfg.num_attention_heads)
    w.add_float32("llama.rope.freq_base", cfg.rope_theta)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_uint32("llama.vocab_size", cfg.vocab_size)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_array("tokenizer.ggml.tokens", ["t", "0", *(f"t{i}" for i in range(cfg.vocab_size - 2))])
    w.add_array("tokenizer.ggml.merges", ["t 0"])
    rng = np.random.default_rng(seed)
    for name, tensor in state.params.items():
        if name in state.ties:
            continue
        data = tensor.detach().float().numpy()
        if ".q_proj." in name:
            data = _permute(data, cfg.num_attention_heads)
        elif ".k_proj." in name:
            data = _permute(data, cfg.num_key_value_heads)
        gname = _gguf_name(name)
        kind = formats.get(gname, "F32") if data.ndim == 2 else "F32"
        if kind == "F32":
            w.add_tensor(gname, data)
        elif kind == "F16":
            w.add_tensor(gname, data.astype(np.float16))
        else:
            w.add_tensor(gname, _blocks(kind, *data.shape, rng, data), raw_dtype=Q[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


# layer 0: one kept format per projection; layer 1: Q4_1, an F16 weight and a Q2_K one (not kept)
MIXED = {
    "token_embd.weight": "Q8_0",
    "blk.0.attn_q.weight": "Q4_0",
    "blk.0.attn_k.weight": "Q5_0",
    "blk.0.attn_v.weight": "Q5_1",
    "blk.0.attn_output.weight": "Q8_0",
    "blk.0.ffn_gate.weight": "Q4_K",
    "blk.0.ffn_up.weight": "Q5_K",
    "blk.0.ffn_down.weight": "Q6_K",
    "blk.1.attn_q.weight": "Q4_1",
    "blk.1.attn_k.weight": "Q4_1",
    "blk.1.attn_v.weight": "F16",
    "blk.1.attn_output.weight": "Q4_1",
    "blk.1.ffn_gate.weight": "Q4_1",
    "blk.1.ffn_up.weight": "Q2_K",
    "blk.1.ffn_down.weight": "Q4_1",
}
UNTIED = {
    "token_embd.weight": "Q6_K",
    "output.weight": "Q4_K",
    **{
        f"blk.{i}.{p}.weight": "Q5_K" for i in range(2) for p in ("attn_q", "attn_k", "attn_v", "attn_output")
    },
    **{f"blk.{i}.{p}.weight": "Q4_0" for i in range(2) for p in ("ffn_gate", "ffn_up", "ffn_down")},
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf_formats")
    return {
        "mixed": _write_mixed(folder / "mixed.gguf", _tiny_state(tied=True, seed=1), MIXED, seed=1),
        "untied": _write_mixed(folder / "untied.gguf", _tiny_state(tied=False, seed=2), UNTIED, seed=2),
    }


def _assert_same_state(a: fmodel.ModelState, b: fmodel.ModelState, saved: bool = False) -> None:
    """Same config (a saved config gains "torch_dtype"), architecture, ties and tensors."""
    extra = {k: v for k, v in a.config.extra.items() if not (saved and k == "torch_dtype")}
    assert a.config.replace(extra=extra) == b.config and a.architecture == b.architecture
    assert dict(a.ties) == dict(b.ties) and set(a.params) == set(b.params)
    for name, t in b.params.items():
        assert a.params[name].dtype == t.dtype and torch.equal(a.params[name], t), name


IDS = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(0))


def test_mixed_file_records_each_layout_and_dequantizes_to_the_float_load(files, caplog):
    with caplog.at_level(logging.DEBUG, logger="fmodel"):
        kept = fmodel.load(files["mixed"], quantized=True)
    floating = fmodel.load(files["mixed"])
    qc = quantization_config(kept.config)
    layouts = module_layouts(qc)
    expected = {
        "model.embed_tokens": KEPT_FORMATS["Q8_0"][0],
        **{
            f"model.layers.0.{m}": KEPT_FORMATS[f][0]
            for m, f in (
                ("self_attn.q_proj", "Q4_0"),
                ("self_attn.k_proj", "Q5_0"),
                ("self_attn.v_proj", "Q5_1"),
                ("self_attn.o_proj", "Q8_0"),
                ("mlp.gate_proj", "Q4_K"),
                ("mlp.up_proj", "Q5_K"),
                ("mlp.down_proj", "Q6_K"),
            )
        },
        **{
            f"model.layers.1.{m}": KEPT_FORMATS["Q4_1"][0]
            for m in (
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.down_proj",
            )
        },
    }
    assert layouts == expected
    assert (qc["scheme"], qc["group_size"]) == ("int4", 32)  # the most common layout; the others listed
    assert set(qc["layouts"]) == {m for m, lay in expected.items() if lay != Layout("int4", 32, True)}
    assert set(qc["skipped_modules"]) == {"model.layers.1.self_attn.v_proj", "model.layers.1.mlp.up_proj"}
    assert dict(qc["tied_modules"]) == {"lm_head": "model.embed_tokens"}
    assert kept.config.tie_word_embeddings is False and not kept.ties
    assert not any(k.startswith("lm_head.") for k in kept.params)  # the head owns nothing
    assert "blk.1.ffn_up.weight (Q2_K)" in caplog.text  # dequantized, and said so
    formats = {m: MIXED[_gguf_name(f"{m}.weight")] for m in expected}
    for module, fmt in formats.items():
        for suffix in ("weight_scale", "weight_zero")[: 1 + expected[module].zero]:
            assert kept.params[f"{module}.{suffix}"].dtype == SCALE_DTYPES[fmt], (module, suffix)
    # the float16 scales are storage: the model computes in float32
    assert kept.dtype == torch.float32 and "torch.float32" in repr(kept)
    _assert_same_state(fmodel.dequantize(kept), floating)  # lossless (ties restored)


def test_mixed_file_logits_equal_the_float_state_and_save_load(files, tmp_path):
    kept = fmodel.load(files["mixed"], quantized=True)
    floating = fmodel.load(files["mixed"])
    module = skeleton(kept.config, kept.architecture)
    assert isinstance(module.model.embed_tokens, QuantEmbedding)
    assert isinstance(module.lm_head, TiedQuantLinear)
    assert isinstance(module.model.layers[0].mlp.down_proj, Int8Linear)
    assert module.model.layers[0].mlp.down_proj.group_size == 16
    assert isinstance(module.model.layers[1].mlp.down_proj, Int4Linear)
    with torch.inference_mode():
        ref = fmodel.forward(floating, IDS).logits
        got = fmodel.forward(kept, IDS).logits  # 40 rows: every module runs its reference
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)  # the same weights; matmul rounding
    fmodel.save(kept, tmp_path / "mixed")
    again = fmodel.load(tmp_path / "mixed")
    assert quantization_config(again.config) == quantization_config(kept.config)
    _assert_same_state(again, kept, saved=True)  # the float16 scales stay float16
    saved = json.loads((tmp_path / "mixed" / "config.json").read_text())
    assert saved["torch_dtype"] == "float32" and again.dtype == torch.float32
    with torch.inference_mode():
        assert torch.equal(fmodel.forward(again, IDS).logits, got)
    # a checkpoint saved before the float16 scales (every scale and zero float32) still loads,
    # and computes the same numbers
    wide = kept.replace(
        params={
            n: t.float() if n.endswith(("weight_scale", "weight_zero")) else t for n, t in kept.params.items()
        }
    )
    fmodel.save(wide, tmp_path / "wide")
    old = fmodel.load(tmp_path / "wide")
    assert {t.dtype for n, t in old.params.items() if n.endswith("weight_scale")} == {torch.float32}
    with torch.inference_mode():
        assert torch.equal(fmodel.forward(old, IDS).logits, got)
    _assert_same_state(fmodel.dequantize(old), fmodel.dequantize(kept), saved=True)
    out = fmodel.generate(kept, IDS[:1, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


def test_untied_file_keeps_embedding_and_output_projection(files):
    kept = fmodel.load(files["untied"], quantized=True)
    floating = fmodel.load(files["untied"])
    qc = quantization_config(kept.config)
    layouts = module_layouts(qc)
    assert layouts["model.embed_tokens"] == Layout("int8", 16, False)  # Q6_K
    assert layouts["lm_head"] == Layout("int4", 32, True)  # Q4_K
    assert "tied_modules" not in qc and qc["skipped_modules"] == ()
    _assert_same_state(fmodel.dequantize(kept), floating)
    with torch.inference_mode():
        torch.testing.assert_close(
            fmodel.forward(kept, IDS).logits, fmodel.forward(floating, IDS).logits, rtol=1e-5, atol=1e-5
        )


def test_quantized_embedding_rows_equal_the_float_lookup(files):
    kept = fmodel.load(files["mixed"], quantized=True)
    floating = fmodel.load(files["mixed"])
    module = skeleton(kept.config, kept.architecture).model.embed_tokens
    table = floating.params["model.embed_tokens.weight"]
    ids = torch.tensor([[0, 5, 63, 5], [1, 2, 3, 4]])
    params = {
        k.removeprefix("model.embed_tokens."): v
        for k, v in kept.params.items()
        if k.startswith("model.embed_tokens.")
    }
    rows = torch.func.functional_call(module, params, (ids,))
    assert rows.dtype == torch.float32 and torch.equal(rows, F.embedding(ids, table))  # bit for bit


@pytest.mark.parametrize(
    ("scale_dtype", "rows_dtype"),
    [(torch.float16, torch.float32), (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)],
)
def test_quantized_embedding_output_dtype(scale_dtype, rows_dtype):
    """Rows come out in the model's float dtype: the scales' dtype, but float32 for float16
    scales (a GGUF load's storage); the values are the float32 dequantization either way."""
    module = QuantEmbedding(8, 64, Layout("int8", 32, False), torch.float32)
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (8, 64), dtype=torch.int8, generator=g)
    scale = (torch.rand(8, 2, generator=g) / 100).to(scale_dtype)
    ids = torch.tensor([[3, 0, 7]])
    rows = torch.func.functional_call(module, {"weight_int8": q, "weight_scale": scale}, (ids,))
    assert rows.dtype == rows_dtype
    want = dequantize_int8(q, scale.float(), None, 32)[ids[0]].to(rows_dtype)
    assert torch.equal(rows[0], want)


def test_state_dtype_leaves_quantization_scales_out():
    """`ModelState.dtype` is the dtype the model computes in: scales and zeros of quantized
    modules are storage (float16 scales in a float32 model stay a float32 model); a state whose
    only floating tensors are scales takes theirs."""
    state = _tiny_state(tied=True)
    q = fmodel.quantize(state, "int4", group_size=32)
    assert q.dtype == torch.float32
    narrow = q.replace(
        params={
            n: t.half() if n.endswith(("weight_scale", "weight_zero")) else t for n, t in q.params.items()
        }
    )
    scales = [n for n in narrow.params if n.endswith(("weight_scale", "weight_zero"))]
    assert len(scales) > len(narrow.params) / 2  # most floating tensors are float16 scales ...
    assert narrow.dtype == torch.float32  # ... and the model is float32
    assert fmodel.init_cache(narrow, 1, 8).dtype == torch.float32
    only = narrow.replace(params={n: narrow.params[n] for n in scales}, ties={})
    assert only.dtype == torch.float16
    # an unquantized state: the most common floating dtype, as before
    assert fmodel.to(state, dtype=torch.float16).dtype == torch.float16


def test_float16_scales_do_not_set_the_dtype_of_a_facade_or_of_drawn_tensors(files, tmp_path):
    """The facade over a kept state (float16 scales first among its floating parameters)
    computes and caches in float32, as `fmodel.generate` does; a kept checkpoint loaded with a
    tensor missing draws it in float32."""
    from safetensors.torch import load_file, save_file

    from fmodel.facade import LlamaForCausalLM

    kept = fmodel.load(files["mixed"], quantized=True)
    assert kept.params["model.embed_tokens.weight_scale"].dtype == torch.float16
    model = LlamaForCausalLM.from_state(kept)
    assert model.dtype == torch.float32
    with torch.inference_mode():
        logits = model(IDS).logits
        torch.testing.assert_close(logits, fmodel.forward(kept, IDS).logits, rtol=1e-5, atol=1e-5)
        assert logits.dtype == torch.float32
        out = model.generate(IDS[:1, :5], max_new_tokens=3, do_sample=False)
    assert torch.equal(out, fmodel.generate(kept, IDS[:1, :5], max_new_tokens=3, do_sample=False))
    fmodel.save(kept, tmp_path / "kept")
    (file,) = (tmp_path / "kept").glob("*.safetensors")
    stored = load_file(file)
    del stored["model.norm.weight"]
    save_file(stored, file, metadata={"format": "pt"})
    drawn = fmodel.load(tmp_path / "kept", allow_missing=True)
    assert drawn.params["model.norm.weight"].dtype == torch.float32


def test_tied_head_multiplies_by_the_embedding_tensors(files):
    kept = fmodel.load(files["mixed"], quantized=True)
    floating = fmodel.load(files["mixed"])
    prefix = "model.embed_tokens."
    table = {k.removeprefix(prefix): v for k, v in kept.params.items() if k.startswith(prefix)}
    embedding = QuantEmbedding(64, 256, Layout("int8", 32, False), torch.float32)
    embedding.load_state_dict(table)
    head = TiedQuantLinear(embedding, False, torch.float32, "float")
    assert dict(head.named_parameters()) == {}  # it owns nothing
    hidden = torch.randn(20, 256, generator=torch.Generator().manual_seed(1))
    ref = hidden @ floating.params["lm_head.weight"].T
    with torch.inference_mode():
        torch.testing.assert_close(head(hidden), ref, rtol=1e-5, atol=1e-5)  # reference path (20 rows)
        torch.testing.assert_close(head(hidden[:2]), ref[:2], rtol=1e-5, atol=1e-5)  # decode-sized
    n_kept = sum(t.numel() * t.element_size() for t in kept.params.values())
    n_float = sum(t.numel() * t.element_size() for n, t in floating.params.items() if n not in floating.ties)
    assert n_kept < 0.45 * n_float  # one int8 table (+ scales), no float copy for the head


def test_transforms_refuse_the_quantized_embedding_by_name(files):
    kept = fmodel.load(files["mixed"], quantized=True)
    for call in (
        lambda: fmodel.resize_token_embeddings(kept, 70),
        lambda: fmodel.get_input_embeddings(kept),
        lambda: fmodel.set_input_embeddings(kept, torch.zeros(64, 256)),
    ):
        with pytest.raises(QuantizationError, match=r"'model\.embed_tokens' of this state is quantized"):
            call()
    with pytest.raises(QuantizationError, match="tied to the quantized embedding"):
        fmodel.untie_weights(kept)
    assert fmodel.tie_weights(kept) is kept  # the tie already holds (in the record)


def test_int8_activations(files, tmp_path):
    kept = fmodel.load(files["mixed"], quantized=True, activations="int8")
    qc = quantization_config(kept.config)
    assert qc["activations"] == "int8"
    module = skeleton(kept.config, kept.architecture)
    linears = [m for m in module.modules() if isinstance(m, (Int8Linear, Int4Linear, TiedQuantLinear))]
    assert linears and all(m.activations == "int8" for m in linears)
    floating = fmodel.load(files["mixed"])
    with torch.inference_mode():
        plain = fmodel.forward(fmodel.load(files["mixed"], quantized=True), IDS).logits
        got = fmodel.forward(kept, IDS).logits
        ref = fmodel.forward(floating, IDS).logits
    assert not torch.equal(got, plain)  # the activations are rounded ...
    # ... by about what rounding activations to 8 bits costs (relative error ~ 1 / 127 per product)
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()
    fmodel.save(kept, tmp_path / "int8act")
    assert quantization_config(fmodel.load(tmp_path / "int8act").config)["activations"] == "int8"
    # the reference semantics, on one layer: F.linear(q8(x), W)
    layer = module.model.layers[0].mlp.down_proj
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(2))
    p = {
        k.removeprefix("model.layers.0.mlp.down_proj."): v
        for k, v in kept.params.items()
        if k.startswith("model.layers.0.mlp.down_proj.")
    }
    w = dequantize_int8(p["weight_int8"], p["weight_scale"], None, 16)
    x20 = torch.randn(20, 256, generator=torch.Generator().manual_seed(3))  # > 16 rows: the reference
    y20 = torch.func.functional_call(layer, p, (x20,))
    want = float32_linear(quantize_activations_q8(x20), w)  # the float32 product fmodel's layers use
    torch.testing.assert_close(y20, want, rtol=1e-6, atol=1e-6)
    # 2 rows: fmodel.kernels' integer dot products where built (exact per block; the blocks'
    # float sums round in another order), else the reference
    y = torch.func.functional_call(layer, p, (x,))
    torch.testing.assert_close(y, F.linear(quantize_activations_q8(x), w), rtol=1e-4, atol=1e-4)


def test_activations_argument_errors(files):
    with pytest.raises(InvalidArgumentError, match=r"load_gguf\(activations\) must be one of"):
        fmodel.load(files["mixed"], quantized=True, activations="int4")
    with pytest.raises(InvalidArgumentError, match="pass quantized=True"):
        fmodel.load(files["mixed"], activations="int8")
    state = _tiny_state(tied=True)
    with pytest.raises(QuantizationError, match="activations"):
        fmodel.quantize(state, "int8", activations="fp8")
    q = fmodel.quantize(state, "int4", group_size=32, activations="int8")
    assert quantization_config(q.config)["activations"] == "int8"
    assert quantization_config(fmodel.quantize(state, "int8").config)["activations"] == "float"


def test_old_records_and_bad_layouts():
    """A record without "activations" / "layouts" (checkpoints saved before them) reads as before;
    a bad "layouts" entry is refused by name."""
    old = {
        "quant_method": "fmodel",
        "scheme": "int8",
        "group_size": None,
        "modules": ["a", "b"],
        "skipped_modules": [],
    }
    assert module_layouts(old) == {"a": Layout("int8", None, False), "b": Layout("int8", None, False)}
    with pytest.raises(InvalidArgumentError, match="not in 'modules'"):
        module_layouts({**old, "layouts": {"c": {"scheme": "int4", "group_size": 32}}})
    with pytest.raises(InvalidArgumentError, match=r"\['layouts'\]\['a'\]: unknown scheme"):
        module_layouts({**old, "layouts": {"a": {"scheme": "int3", "group_size": 32}}})
    with pytest.raises(InvalidArgumentError, match="an int8 zero needs groups"):
        module_layouts({**old, "zero": True})


def test_truncated_mixed_file_is_refused_before_conversion(files, tmp_path):
    with open(files["mixed"], "rb") as f:
        data = f.read()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 5000])
    with pytest.raises(CorruptFileError, match="truncated file"):
        fmodel.load(cut, quantized=True)
