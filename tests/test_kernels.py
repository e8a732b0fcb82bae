"""fmodel.kernels: each op against the float64 product of its dequantized weight (weight-only and
dense within float32 accumulation rounding, act_int8 within the bound of x's int8 rounding),
bit-identical to a pure-torch emulation of the same integer math on data where every float
operation is exact, the portable loops against the AVX-512 code, 1 vs 2 threads, x of 1..16 rows,
random shapes (Hypothesis), the unavailable paths, and the fake implementations under
torch.compile / torch.export."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fmodel.kernels as fk
from fmodel.errors import InvalidArgumentError, KernelBuildError
from fmodel.kernels import _build

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
U = 2.0**-24  # float32 unit roundoff


@pytest.fixture(scope="module", autouse=True)
def kernels():
    """The extension, built once. A machine with a compiler and ninja must build it: failing to
    is a test failure, not a skip."""
    if not fk.available():
        reason = _build.load_error()
        if os.environ.get("FMODEL_KERNELS") == "0" or not (shutil.which("c++") and shutil.which("ninja")):
            pytest.skip(f"fmodel.kernels unavailable here: {reason}")
        pytest.fail(f"fmodel.kernels did not build on a machine with a compiler: {reason}")


@pytest.fixture(params=["simd", "portable"])
def impl(request):
    """Each test once with the AVX-512 code (where compiled) and once with the portable loops."""
    if request.param == "portable":
        with fk._portable():
            yield request.param
    else:
        yield request.param


# --------------------------------------------------------------------------- references


def pack(q: torch.Tensor) -> torch.Tensor:
    """[N, K] in 0..15 -> [N, ceil(K/2)] uint8, column 2j in the low nibble."""
    if q.shape[1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def expand(t: torch.Tensor, k: int, group: int) -> torch.Tensor:
    """[N, G] per-group values -> [N, K] per column (float64)."""
    return t.double()[:, torch.arange(k) // group]


def dequant(q, scale, zero, group):
    w = q.double() * expand(scale, q.shape[1], group)
    return w if zero is None else w + expand(zero, q.shape[1], group)


def magnitude(x, q, scale, zero, group):
    """sum_k (|q * scale| + |zero|) * |x|: what float32 rounding errors are relative to."""
    a = (q.double() * expand(scale, q.shape[1], group)).abs()
    if zero is not None:
        a = a + expand(zero, q.shape[1], group).abs()
    return x.double().abs() @ a.T


def quantize_emulated(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's Q8_1 scheme in torch ops, as the kernels apply it (float32 throughout)."""
    m, k = x.shape
    kb = (k + 31) // 32
    xb = torch.nn.functional.pad(x, (0, kb * 32 - k)).view(m, kb, 32)
    d = xb.abs().amax(-1) / 127
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    q = torch.round(xb * inv[..., None]).clamp(-127, 127).to(torch.int8)  # round half to even
    return q.view(m, kb * 32), d


def a8_emulated(x, q, scale, zero, group):
    """The act_int8 result from the emulated quantization: sum over columns of
    (scale_g * q_w + zero_g) * d_b * q_x, in float64 (exact for the integer parts)."""
    qx, d = quantize_emulated(x)
    k = x.shape[1]
    xq = qx[:, :k].double() * d.double()[:, torch.arange(k) // 32]
    return xq @ dequant(q, scale, zero, group).T, xq


def a8_bound(x, q, scale, zero, group):
    """|act_int8 - x @ W.T| <= sum_k |W[n, k]| * d_b(k) / 2 (each q_x is within d/2 of x / d),
    plus float32 rounding."""
    _, d = quantize_emulated(x)
    half = d.double()[:, torch.arange(x.shape[1]) // 32] / 2
    return half @ dequant(q, scale, zero, group).abs().T


def rounding_bound(k: int, mag: torch.Tensor) -> torch.Tensor:
    # 16-lane accumulation: ceil(K/16) sequential additions per lane, a 4-level tree, the group
    # scale and zero terms; 4x slack over that first-order bound
    return 4 * (k // 16 + 16) * U * mag + 1e-30


def int4_case(n, k, group, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = (k + group - 1) // group
    q = torch.randint(0, 16, (n, k), generator=g)
    scale = torch.rand(n, groups, generator=g) * 0.02 + 1e-3
    zero = -torch.rand(n, groups, generator=g) * 0.15
    x = torch.randn(m, k, generator=g)
    return x, q, pack(q), scale, zero


def int8_case(n, k, group, m, with_zero, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = (k + group - 1) // group
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, groups, generator=g) * 0.01 + 1e-4
    zero = torch.randn(n, groups, generator=g) * 0.01 if with_zero else None
    x = torch.randn(m, k, generator=g)
    return x, q, scale, zero


def check(y, x, q, scale, zero, group, act_int8):
    ref = x.double() @ dequant(q, scale, zero, group).T
    mag = magnitude(x, q, scale, zero, group)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    if act_int8:
        emu, xq = a8_emulated(x, q, scale, zero, group)
        # the same integers: equal to the emulation up to float32 rounding of the sums
        assert (
            (y.double() - emu).abs() <= rounding_bound(x.shape[1], magnitude(xq, q, scale, zero, group))
        ).all()
        assert (
            (y.double() - ref).abs()
            <= a8_bound(x, q, scale, zero, group) * 1.001 + rounding_bound(x.shape[1], mag)
        ).all()
    else:
        assert ((y.double() - ref).abs() <= rounding_bound(x.shape[1], mag)).all()


# --------------------------------------------------------------------------- accuracy

SMOLLM2 = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # q, k/v, gate/up, down


@pytest.mark.parametrize("act_int8", [False, True])
@pytest.mark.parametrize(
    ("n", "k", "group"),
    [
        (64, 576, 32),
        (37, 100, 32),
        (33, 577, 32),
        (40, 256, 64),
        (17, 512, 128),
        (20, 96, 48),
        (9, 30, 7),
        (5, 1, 32),
    ],
)
def test_int4(impl, n, k, group, act_int8):
    x, q, packed, scale, zero = int4_case(n, k, group, 3)
    check(fk.int4_linear(x, packed, scale, zero, group, act_int8), x, q, scale, zero, group, act_int8)


@pytest.mark.parametrize("act_int8", [False, True])
@pytest.mark.parametrize("with_zero", [False, True])
@pytest.mark.parametrize(
    ("n", "k", "group"),
    [
        (64, 576, 32),
        (64, 576, 576),
        (37, 100, 100),
        (33, 577, 16),
        (40, 256, 64),
        (17, 512, 128),
        (20, 96, 12),
        (9, 30, 7),
    ],
)
def test_int8(impl, n, k, group, with_zero, act_int8):
    x, q, scale, zero = int8_case(n, k, group, 3, with_zero)
    check(fk.int8_linear(x, q, scale, zero, group, act_int8), x, q, scale, zero, group, act_int8)


@pytest.mark.parametrize("x_bf16", [False, True], ids=["x-f32", "x-bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "k", "rows"), [(64, 576, 4), (37, 100, 3), (5, 7, 16), (3, 1, 1), (40, 33, 2)])
def test_dense(impl, n, k, rows, dtype, x_bf16):
    """Within float32 accumulation rounding; an x that is exactly bfloat16 (a bfloat16 model's
    activations) over a bfloat16 weight runs the vdpbf16ps kernel where the CPU has one."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = torch.randn(rows, k, generator=g)
    if x_bf16:
        x = x.bfloat16().float()
    ref = x.double() @ w.double().T
    mag = x.double().abs() @ w.double().abs().T
    assert ((fk.dense_linear(x, w).double() - ref).abs() <= rounding_bound(k, mag)).all()


@pytest.mark.parametrize("act_int8", [False, True])
@pytest.mark.parametrize(("n", "k"), SMOLLM2)
def test_smollm2_shapes(n, k, act_int8):
    """SmolLM2-135M's projections as GGUF Q4_1 (group 32) and Q8_0 (group 32, no zero)."""
    x, q, packed, scale, zero = int4_case(n, k, 32, 1, seed=n + k)
    check(fk.int4_linear(x, packed, scale, zero, 32, act_int8), x, q, scale, zero, 32, act_int8)
    x, q, scale, _ = int8_case(n, k, 32, 1, False, seed=n + k)
    check(fk.int8_linear(x, q, scale, None, 32, act_int8), x, q, scale, None, 32, act_int8)


# --------------------------------------------------------------------------- exact integer math


def exact_x(m, k, g):
    """x whose act_int8 quantization is exact: per block of 32 an integer pattern with one +-127
    (so d = 2**e exactly), small integers elsewhere, times 2**e."""
    kb = (k + 31) // 32
    ints = torch.randint(-8, 9, (m, kb, 32), generator=g)
    ints[:, :, 0] = 127 * (torch.randint(0, 2, (m, kb), generator=g) * 2 - 1)
    ints = ints[:, :, torch.randperm(32, generator=g)]
    e = torch.randint(-1, 2, (m, kb, 1), generator=g)
    return (ints * 2.0**e).reshape(m, kb * 32)[:, :k].float().contiguous()


@pytest.mark.parametrize("act_int8", [False, True])
@pytest.mark.parametrize(
    ("n", "k", "group"), [(24, 256, 32), (19, 160, 64), (8, 256, 128), (13, 96, 8), (6, 77, 32)]
)
def test_int4_bit_identical_to_emulation(impl, n, k, group, act_int8):
    """Power-of-two scales, zeros on a 1/16 grid, x on a 2**e grid: every product and partial sum
    is a float32 number, so any order of summation gives the emulation's value exactly; any
    mistake in the nibble, lane, block or group bookkeeping shows as a difference."""
    g = torch.Generator().manual_seed(n * k + group)
    groups = (k + group - 1) // group
    q = torch.randint(0, 16, (n, k), generator=g)
    scale = 2.0 ** torch.randint(-2, 1, (n, groups), generator=g).float()
    zero = torch.randint(-16, 17, (n, groups), generator=g).float() / 16
    x = exact_x(4, k, g)
    qx, d = fk.quantize_act(x)
    assert torch.equal(qx, quantize_emulated(x)[0]) and torch.equal(d, quantize_emulated(x)[1])
    ref = (
        a8_emulated(x, q, scale, zero, group)[0]
        if act_int8
        else x.double() @ dequant(q, scale, zero, group).T
    )
    assert ref.abs().max() < 2.0**17  # a multiple of 2**-6 below 2**17: exact in float32
    assert torch.equal(fk.int4_linear(x, pack(q), scale, zero, group, act_int8).double(), ref)


@pytest.mark.parametrize("act_int8", [False, True])
@pytest.mark.parametrize("with_zero", [False, True])
@pytest.mark.parametrize(
    ("n", "k", "group"), [(24, 256, 32), (19, 192, 64), (8, 256, 256), (13, 96, 16), (6, 77, 32)]
)
def test_int8_bit_identical_to_emulation(impl, n, k, group, with_zero, act_int8):
    g = torch.Generator().manual_seed(n * k + group)
    groups = (k + group - 1) // group
    q = torch.randint(-16, 17, (n, k), generator=g, dtype=torch.int8)
    q[:, 0] = 127
    q[:, 1] = -127
    scale = 2.0 ** torch.randint(-2, 1, (n, groups), generator=g).float()
    zero = torch.randint(-16, 17, (n, groups), generator=g).float() / 16 if with_zero else None
    x = exact_x(4, k, g)
    ref = (
        a8_emulated(x, q, scale, zero, group)[0]
        if act_int8
        else x.double() @ dequant(q, scale, zero, group).T
    )
    assert ref.abs().max() < 2.0**17
    assert torch.equal(fk.int8_linear(x, q, scale, zero, group, act_int8).double(), ref)


@pytest.mark.parametrize("act_int8", [False, True])
@pytest.mark.parametrize("group", [32, 64, 128, 576, 24])
def test_float16_scales_equal_float32_of_them(impl, group, act_int8):
    """GGUF's float16 d / m read as stored: the result is the float32 call on their float32
    values, bit for bit (including subnormal and zero scales). Groups of 24 have no fixed lane
    pattern: float32 scales are gathered there, float16 ones run the portable loops, so the two
    agree to float32 rounding only (int4, both activation kinds)."""
    x, q, packed, scale, zero = int4_case(40, 576, group, 3, seed=group)
    scale, zero = scale.half(), zero.half()
    scale[0, 0], scale[1, 0], zero[2, 0] = 3e-6, 0.0, -1e-7  # float16 subnormals, a zero
    same = torch.equal if group != 24 or impl == "portable" else _close
    got = fk.int4_linear(x, packed, scale, zero, group, act_int8)
    assert same(got, fk.int4_linear(x, packed, scale.float(), zero.float(), group, act_int8))
    check(got, x, q, scale.float(), zero.float(), group, act_int8)
    x, q8, scale8, zero8 = int8_case(40, 576, group, 3, True, seed=group)
    for z in (zero8.half(), None):
        got = fk.int8_linear(x, q8, scale8.half(), z, group, act_int8)
        want = fk.int8_linear(x, q8, scale8.half().float(), None if z is None else z.float(), group, act_int8)
        assert same(got, want)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_quantize_act_is_llama_cpp_q8(impl):
    """Bit for bit the torch emulation, including ties (half to even), zero blocks and a
    partial last block; d is max|x| / 127."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 100, generator=g)
    x[0, :32] = 0  # an all-zero block: d = 0, q = 0
    x[1, :32] = torch.arange(32) - 15.5  # amax 15.5: many x * (1/d) near .5
    q, d = fk.quantize_act(x)
    eq, ed = quantize_emulated(x)
    assert torch.equal(q, eq) and torch.equal(d, ed)
    assert (q[:, 100:] == 0).all() and (q[0, :32] == 0).all() and d[0, 0] == 0


# --------------------------------------------------------------------------- rows, threads


@pytest.mark.parametrize("op", ["int4", "int4_a8", "int8", "int8_a8", "f32", "bf16"])
def test_batched_rows_equal_single_rows_and_threads(op):
    """x of 1..16 rows: each output row equals that row computed alone, and 1 thread equals 2,
    bit for bit (a row's sums do not depend on the batch or on which thread computes it)."""
    n, k = 1100, 576  # enough rows for parallel_for to split the work over 2 threads
    x4, _q4, packed, scale4, zero4 = int4_case(n, k, 32, 16, seed=5)
    x8, q8, scale8, _ = int8_case(n, k, 32, 16, False, seed=5)
    w = torch.randn(n, k)
    run = {
        "int4": lambda x: fk.int4_linear(x, packed, scale4, zero4, 32, False),
        "int4_a8": lambda x: fk.int4_linear(x, packed, scale4, zero4, 32, True),
        "int8": lambda x: fk.int8_linear(x, q8, scale8, None, 32, False),
        "int8_a8": lambda x: fk.int8_linear(x, q8, scale8, None, 32, True),
        "f32": lambda x: fk.dense_linear(x, w),
        "bf16": lambda x: fk.dense_linear(x, w.bfloat16()),
    }[op]
    x = x4 if op.startswith("int4") else x8
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.cat([run(x[i : i + 1]) for i in range(16)])
        one = {m: run(x[:m]) for m in range(1, 17)}
        torch.set_num_threads(2)
        two = {m: run(x[:m]) for m in range(1, 17)}
    finally:
        torch.set_num_threads(threads)
    for m in range(1, 17):
        assert torch.equal(one[m], alone[:m]) and torch.equal(two[m], one[m])


def test_leading_dims_and_empty():
    x, _q, packed, scale, zero = int4_case(8, 64, 32, 6)
    y = fk.int4_linear(x.view(2, 3, 64), packed, scale, zero, 32, False)
    assert y.shape == (2, 3, 8) and torch.equal(
        y.view(6, 8), fk.int4_linear(x, packed, scale, zero, 32, False)
    )
    assert fk.int4_linear(x[:0], packed, scale, zero, 32, True).shape == (0, 8)
    assert fk.dense_linear(x[:, :0], torch.empty(5, 0)).eq(0).all()


@given(
    n=st.integers(1, 40),
    k=st.integers(1, 300),
    m=st.integers(1, 16),
    group=st.sampled_from([8, 16, 32, 64, 128, 5, "all"]),
    act_int8=st.booleans(),
    portable=st.booleans(),
    seed=st.integers(0, 2**16),
)
@SETTINGS
def test_random_shapes(n, k, m, group, act_int8, portable, seed):
    group = k if group == "all" else group
    x, q, packed, scale, zero = int4_case(n, k, group, m, seed)
    x8, q8, scale8, zero8 = int8_case(n, k, group, m, seed % 2 == 0, seed)
    ctx = fk._portable() if portable else _nothing()
    with ctx:
        y4 = fk.int4_linear(x, packed, scale, zero, group, act_int8)
        y8 = fk.int8_linear(x8, q8, scale8, zero8, group, act_int8)
    check(y4, x, q, scale, zero, group, act_int8)
    check(y8, x8, q8, scale8, zero8, group, act_int8)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------- errors, availability


def test_bad_arguments_raise_named_errors():
    x, q, packed, scale, zero = int4_case(8, 64, 32, 2)
    with pytest.raises(InvalidArgumentError, match="packed must be"):
        fk.int4_linear(x, packed[:, :-1], scale, zero, 32, False)
    with pytest.raises(InvalidArgumentError, match="scale must be"):
        fk.int4_linear(x, packed, scale[:, :1], zero, 32, False)
    with pytest.raises(InvalidArgumentError, match="zero must have scale's dtype"):
        fk.int4_linear(x, packed, scale, zero.half(), 32, False)
    with pytest.raises(InvalidArgumentError, match="scale must be float32 or float16"):
        fk.int4_linear(x, packed, scale.double(), zero.double(), 32, False)
    with pytest.raises(InvalidArgumentError, match="x must be float32"):
        fk.int4_linear(x.double(), packed, scale, zero, 32, False)
    with pytest.raises(InvalidArgumentError, match="group_size"):
        fk.int8_linear(x, q.to(torch.int8), scale, None, 0, False)
    with pytest.raises(InvalidArgumentError, match="q must be"):
        fk.int8_linear(x, q, scale, None, 32, False)  # int64, not int8
    with pytest.raises(InvalidArgumentError, match="weight must be float32 or bfloat16"):
        fk.dense_linear(x, torch.zeros(3, 64, dtype=torch.float16))
    with pytest.raises(InvalidArgumentError, match=r"x must be \[\.\.\., 65\]"):
        fk.dense_linear(x, torch.zeros(3, 65))


def test_unavailable_raises_named_error(monkeypatch, caplog):
    """FMODEL_KERNELS=0: available() is False (the reason logged once), build() and every op
    raise KernelBuildError."""
    state: dict = {}
    monkeypatch.setattr(_build, "_state", state)
    monkeypatch.setattr(fk, "_state", state)
    monkeypatch.setattr(fk, "_OPS", {})  # a fresh process: nothing loaded yet
    monkeypatch.setenv("FMODEL_KERNELS", "0")
    with caplog.at_level("WARNING", logger="fmodel"):
        assert fk.available() is False
        assert fk.available() is False
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert "FMODEL_KERNELS=0" in caplog.records[0].getMessage()
    x, q, packed, scale, zero = int4_case(4, 32, 32, 1)
    for call in (
        fk.build,
        lambda: fk.int4_linear(x, packed, scale, zero, 32, True),
        lambda: fk.int8_linear(x, q.to(torch.int8), scale, None, 32, False),
        lambda: fk.dense_linear(x, x),
    ):
        with pytest.raises(KernelBuildError, match="FMODEL_KERNELS=0"):
            call()


def test_failed_build_raises_named_error(monkeypatch, tmp_path):
    """A compiler that fails: KernelBuildError naming the build directory, not a crash."""
    state: dict = {}
    monkeypatch.setattr(_build, "_state", state)
    monkeypatch.setattr(fk, "_state", state)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(KernelBuildError, match="building the extension in"):
        fk.build()
    assert fk.available() is False and "building the extension" in _build.load_error()


def test_missing_sources_raise_named_error(monkeypatch, tmp_path):
    """An install without csrc/ (package data left out): KernelBuildError, not FileNotFoundError."""
    state: dict = {}
    monkeypatch.setattr(_build, "_state", state)
    monkeypatch.setattr(fk, "_state", state)
    monkeypatch.setattr(_build, "CSRC", tmp_path / "csrc")
    with pytest.raises(KernelBuildError, match="sources are missing"):
        fk.build()


def test_damaged_library_raises_named_error(monkeypatch, tmp_path):
    """A cached library that cannot be loaded: KernelBuildError naming the file."""
    state: dict = {}
    monkeypatch.setattr(_build, "_state", state)
    monkeypatch.setattr(fk, "_state", state)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    name = _build.extension_name()
    (tmp_path / name).mkdir()
    (tmp_path / name / f"{name}.so").write_bytes(b"not a shared library")
    (tmp_path / name / "fmodel-ready").write_text(name)
    with pytest.raises(KernelBuildError, match=r"loading .* failed"):
        fk.build()


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_portable_build_compiles_without_avx512(tmp_path):
    """The kernels' half of the extension compiles for a baseline x86-64 / any CPU (no AVX-512:
    the portable loops only), as on a machine without VNNI."""
    src = Path(fk.__file__).parent / "csrc" / "kernels.cpp"
    flags = ["-march=x86-64"] if os.uname().machine == "x86_64" else []
    result = subprocess.run(
        ["c++", "-std=c++17", "-O1", *flags, "-c", str(src), "-o", str(tmp_path / "k.o")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    result = subprocess.run(["nm", "-C", str(tmp_path / "k.o")], capture_output=True, text=True)
    assert "Int4A8" not in result.stdout  # no AVX-512 kernel compiled in


def test_second_process_loads_from_cache():
    """`python -m fmodel.kernels build` in a fresh process finds the built library by name and
    loads it without compiling (well under the seconds a build takes)."""
    run = subprocess.run(
        [sys.executable, "-m", "fmodel.kernels", "build"], capture_output=True, text=True, check=True
    )
    seconds = float(run.stdout.rsplit(", ", 1)[1].split(" s)")[0])
    assert _build.extension_name() in run.stdout and seconds < 2.0, run.stdout
    info = subprocess.run(
        [sys.executable, "-m", "fmodel.kernels", "info"], capture_output=True, text=True, check=True
    )
    assert "(built)" in info.stdout


@pytest.mark.parametrize("act_int8", [False, True])
def test_gradient_wrt_x_is_the_dequantized_weight(act_int8):
    """x.grad = grad @ W (dequantized; straight-through for act_int8's rounding); weights get none."""
    x, q, packed, scale, zero = int4_case(12, 70, 32, 3)
    x8, q8, scale8, zero8 = int8_case(12, 70, 16, 3, True)
    grad = torch.randn(3, 12)
    cases = [
        (x, lambda x: fk.int4_linear(x, packed, scale, zero, 32, act_int8), dequant(q, scale, zero, 32)),
        (x8, lambda x: fk.int8_linear(x, q8, scale8, zero8, 16, act_int8), dequant(q8, scale8, zero8, 16)),
        (x8, lambda x: fk.dense_linear(x, scale8.repeat(1, 14)[:, :70].contiguous()), None),
    ]
    for x0, f, w in cases:
        xr = x0.clone().requires_grad_(True)
        f(xr).backward(grad)
        if w is None:
            w = scale8.repeat(1, 14)[:, :70].double()
        assert torch.allclose(xr.grad.double(), grad.double() @ w, rtol=1e-5, atol=1e-6)


def test_opcheck():
    """torch.library.opcheck: schema, fake tensors, autograd registration, AOT dispatch."""
    x, _q, packed, scale, zero = int4_case(24, 64, 32, 3)
    _, q8, scale8, zero8 = int8_case(24, 64, 32, 3, True)
    for xr in (x, x.clone().requires_grad_(True)):
        torch.library.opcheck(torch.ops.fmodel.int4_linear.default, (xr, packed, scale, zero, 32, True))
        torch.library.opcheck(
            torch.ops.fmodel.int8_linear.default, (xr, q8, scale8.half(), zero8.half(), 32, False)
        )
        torch.library.opcheck(torch.ops.fmodel.dense_linear.default, (xr, torch.randn(5, 64).bfloat16()))


# --------------------------------------------------------------------------- torch.compile / export


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        _x, _q, packed, scale, zero = int4_case(24, 64, 32, 1)
        _, q8, scale8, _ = int8_case(24, 24, 24, 1, False)
        self.packed, self.scale, self.zero = packed, scale, zero
        self.q8, self.scale8 = q8, scale8
        self.w = torch.randn(16, 24)

    def forward(self, x):
        h = fk.int4_linear(x, self.packed, self.scale, self.zero, 32, True)
        h = torch.relu(h)
        h = fk.int8_linear(h, self.q8, self.scale8, None, 24, False)
        return fk.dense_linear(h, self.w.bfloat16()) + fk.dense_linear(h, self.w)


def test_fake_impls_under_compile_and_export():
    module = Tiny()
    x = torch.randn(3, 64)
    eager = module(x)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), eager)
    exported = torch.export.export(module, (x,))
    assert torch.equal(exported.module()(x), eager)
    assert "fmodel.int4_linear" in str(exported.graph)


def test_inductor_calls_the_op():
    """Inductor compiles a graph around the op (the fake impl gives it the shapes) and equals eager."""
    x, _q, packed, scale, zero = int4_case(8, 64, 32, 2)

    def f(x):
        return fk.int4_linear(x * 2, packed, scale, zero, 32, False) + 1

    assert torch.allclose(torch.compile(f, fullgraph=True)(x), f(x), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- decode attention


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    r=st.integers(1, 9),
    s=st.integers(1, 70),
    d=st.sampled_from([1, 8, 17, 64, 80]),
    spare=st.integers(0, 5),
    bf16=st.booleans(),
    per_head_mask=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_decode_attention_is_sdpa_over_the_unmasked_keys(
    impl, b, h, r, s, d, spare, bf16, per_head_mask, seed
):
    """Against float64 attention on the same (widened) inputs: softmax over the unmasked keys,
    within float32 accumulation (bfloat16: one rounding of the output on top); a row with no
    key to attend gives zeros; the cache may be a slice of a longer buffer; inputs unchanged."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, r, d, generator=g).to(dtype)
    buf_k = torch.randn(b, h, s + spare, d, generator=g).to(dtype)
    buf_v = torch.randn(b, h, s + spare, d, generator=g).to(dtype)
    k, v = buf_k[:, :, :s], buf_v[:, :, :s]  # a cache sliced to its length
    mask = torch.rand(b, h if per_head_mask else 1, r, s, generator=g) > 0.4
    mask[..., 0, :] = False  # a row that attends to nothing
    before = [t.clone() for t in (q, buf_k, buf_v, mask)]
    scale = d**-0.5
    got = fk.decode_attention(q, k, v, mask, scale)
    assert got.dtype == dtype and got.shape == (b, h, r, d) and got.is_contiguous()
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    want = weights @ v.double()
    bound = 8 * (s + d) * U * (weights @ v.double().abs()) + 1e-30
    if bf16:
        bound = bound + want.abs() * 2.0**-8
    assert bool(((got.double() - want).abs() <= bound).all())
    assert bool((got[..., 0, :] == 0).all())
    for t, old in zip((q, buf_k, buf_v, mask), before, strict=True):
        assert torch.equal(t, old)


def test_decode_attention_names_bad_inputs():
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8)
    mask = torch.ones(1, 1, 3, 5, dtype=torch.bool)
    with pytest.raises(InvalidArgumentError, match="mask must be bool"):
        fk.decode_attention(q, k, k, mask.float(), 0.5)
    with pytest.raises(InvalidArgumentError, match="k and v must have q's dtype"):
        fk.decode_attention(q, k.bfloat16(), k, mask, 0.5)
    with pytest.raises(InvalidArgumentError, match=r"k and v must be \[1, 2, S, 8\]"):
        fk.decode_attention(q, torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), mask, 0.5)
    with pytest.raises(InvalidArgumentError, match="4-D"):
        fk.decode_attention(q[0], k, k, mask, 0.5)


def test_dense_takes_a_bfloat16_x_as_its_float32_widening():
    """A bfloat16 x (a bfloat16 model's activations, passed as they are) gives exactly what its
    float32 widening gives, for a bfloat16 or a float32 weight; the result is float32."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 2, 70, generator=g).bfloat16()
    for w in (torch.randn(33, 70, generator=g).bfloat16(), torch.randn(33, 70, generator=g)):
        got = fk.dense_linear(x, w)
        assert got.dtype == torch.float32 and got.shape == (3, 2, 33)
        assert torch.equal(got, fk.dense_linear(x.float(), w))
