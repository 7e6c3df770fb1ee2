"""The Triton weight-only FP8 matmul (lragent.kernels.triton_fp8, W8A16) against the dequantised torch reference
x @ (W.float() * scale).T, and its routing from the FP8 projections (lragent.quant.fp8).

Without CUDA the kernel runs under TRITON_INTERPRET=1 (set by conftest / below), which loads float8_e4m3fn tensors
("native" decode) as well as their bytes ("bits" decode); with CUDA the same cases run compiled, plus the routing and
engine tests (GPU only).

Tolerances: float32 activations, dot in IEEE float32: the reference's own rounding, rtol 1e-5 plus an absolute term of
1e-6 * sum_k |x_k w_k| (two float32 sums in different orders). bfloat16 activations: the products are exact in float32
on both sides, so the difference is the rounding of the output to bfloat16: half an ulp (2^-8 relative) compiled, up
to one ulp (2^-7) interpreted (the interpreter truncates on the float32 -> bfloat16 cast), plus the same summation term.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first @triton.jit of the kernel modules

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from lragent.kernels.counters import counters_of  # noqa: E402
from lragent.kernels.triton_fp8 import (  # noqa: E402
    DECODE_TILES,
    _decode_e4m3,
    can_fuse_act,
    gemv_config,
    w8a16_config,
    w8a16_linear,
)
from lragent.kernels.triton_fused import silu_mul  # noqa: E402
from lragent.quant.fp8 import (  # noqa: E402
    FP8,
    TRITON_MAX_ROWS,
    Fp8Linear,
    Fp8Weight,
    dequantize_fp8,
    quantize_fp8,
    triton_rows_for,
)

DEVICE = torch.device("cuda" if CUDA else "cpu")
NATIVE_OK = not CUDA or torch.cuda.get_device_capability() >= (8, 9)  # tl.float8e4nv loads
DECODES = ["bits", "native"] if NATIVE_OK else ["bits"]
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
NAN_CODES = (0x7F, 0xFF)  # e4m3fn's NaNs: the quantiser never writes them (it saturates at +-448)


@triton.jit
def _decode_kernel(w_ptr, out_ptr, BITS: tl.constexpr):
    offs = tl.arange(0, 256)
    tl.store(out_ptr + offs, _decode_e4m3(tl.load(w_ptr + offs), BITS).to(tl.float32))


@pytest.mark.parametrize("decode", DECODES)
def test_decode_every_byte_matches_torch(decode):
    """All 256 byte values: the kernel's decode against torch's float8_e4m3fn -> float32 (the "bits" decode gives
    the value * 2^-8, folded into the scale); the two NaN codes decode to +-480 (never stored, see module doc)."""
    raw = torch.arange(256, dtype=torch.uint8, device=DEVICE)
    out = torch.full((256,), float("nan"), device=DEVICE)
    _decode_kernel[(1,)](raw if decode == "bits" else raw.view(FP8), out, BITS=decode == "bits")
    got = out.cpu() * (256.0 if decode == "bits" else 1.0)
    want = raw.cpu().view(FP8).float()
    finite = torch.ones(256, dtype=torch.bool)
    finite[list(NAN_CODES)] = False
    assert torch.equal(got[finite], want[finite])
    assert torch.equal(torch.sign(got[finite]), torch.sign(want[finite]))  # -0.0 stays -0.0 (sign bit)
    assert (got[0x80] == 0) and torch.signbit(got[0x80])
    if decode == "bits" or not CUDA:
        assert got[0x7F].item() == 480.0 and got[0xFF].item() == -480.0


def _problem(m: int, n: int, k: int, dtype: torch.dtype, seed: int, bias: bool):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.logspace(-3, 1, n)[:, None]  # the scales must follow each row
    w8, scale = quantize_fp8(w)
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = (torch.randn(n, generator=gen) if bias else None,)[0]
    dev = [t.to(DEVICE) if t is not None else None for t in (x, w8, scale, b.to(dtype) if b is not None else None)]
    return dev


def _check(got: torch.Tensor, x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    wf = dequantize_fp8(w8, scale, torch.float32)
    want = x.float() @ wf.t()
    if bias is not None:
        want = want + bias.float()
    mag = x.float().abs() @ wf.abs().t()  # sum_k |x_k w_k|
    if got.dtype == torch.float32:
        tol = 1e-5 * want.abs() + 1e-6 * mag + 1e-30
    else:
        ulp = 2.0**-8 if CUDA else 2.0**-7
        tol = ulp * want.abs() * 1.001 + 1e-6 * mag + 1e-30
    err = (got.float() - want).abs()
    assert got.shape == want.shape and got.dtype == x.dtype
    assert torch.isfinite(got).all()
    assert (err <= tol).all(), f"worst excess {(err - tol).max().item():.3g} (err {err.max().item():.3g})"


@pytest.mark.parametrize("decode", DECODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 16, 33])
def test_w8a16_matches_dequantised_reference(m, dtype, decode):
    """N and K not multiples of the tiles; one launch, and split-K (partials + reduce) on the same problem; even
    shapes too (the unmasked weight loads)."""
    x, w8, scale, bias = _problem(m, 72, 200, dtype, seed=m, bias=m % 2 == 1)
    for split_k in (1, 3):
        kw = dict(decode=decode, block_n=32, block_k=64, split_k=split_k, gemv=False)
        _check(w8a16_linear(x, w8, scale, bias, **kw), x, w8, scale, bias)
    x, w8, scale, bias = _problem(m, 64, 256, dtype, seed=m + 1, bias=False)
    kw = dict(decode=decode, block_n=32, block_k=64, split_k=2, gemv=False)
    _check(w8a16_linear(x, w8, scale, bias, **kw), x, w8, scale, bias)


@pytest.mark.parametrize("decode", DECODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "k", "block_n", "block_k"), [(72, 200, 32, 64), (64, 256, 16, 128), (5, 40, 16, 16)])
def test_w8a16_gemv_matches_dequantised_reference(n, k, block_n, block_k, dtype, decode, monkeypatch):
    """The single-row kernel (no `tl.dot`): ragged and even N / K, with and without bias, chosen by `gemv=True` and
    by the module switch (LRAGENT_FP8_GEMV); rows > 1 keep the tiled kernel."""
    import lragent.kernels.triton_fp8 as mod

    x, w8, scale, bias = _problem(1, n, k, dtype, seed=n + k, bias=n % 2 == 0)
    _check(w8a16_linear(x, w8, scale, bias, decode=decode, gemv=True, block_n=block_n, block_k=block_k),
           x, w8, scale, bias)  # fmt: skip
    monkeypatch.setattr(mod, "GEMV", True)
    calls = []
    real = mod._w8a16_gemv_kernel
    counting = type("Counting", (), {"__getitem__": lambda self, grid: calls.append(grid) or real[grid]})
    monkeypatch.setattr(mod, "_w8a16_gemv_kernel", counting())
    _check(w8a16_linear(x, w8, scale, bias, decode=decode, block_n=block_n, block_k=block_k), x, w8, scale, bias)
    x3, w3, s3, b3 = _problem(3, n, k, dtype, seed=1, bias=False)
    _check(w8a16_linear(x3, w3, s3, b3, decode=decode, block_n=32, block_k=64), x3, w3, s3, b3)
    assert len(calls) == 1  # one single-row call took it, the 3-row one did not


@pytest.mark.parametrize("decode", DECODES)
@pytest.mark.parametrize(("n", "k", "block_k", "split_k"), [(40, 200, 32, 2), (40, 200, 32, 3), (17, 256, 64, 4),
                                                            (16, 100, 64, 8)])  # fmt: skip
def test_w8a16_gemv_split_k(n, k, block_k, split_k, decode):
    """Split over K (partials per split, then the reduce that scales and adds the bias): ragged K, a K whose splits
    do not divide it, and more splits asked than K has tiles (capped)."""
    x, w8, scale, bias = _problem(1, n, k, torch.bfloat16, seed=k + split_k, bias=split_k % 2 == 0)
    out = w8a16_linear(x, w8, scale, bias, decode=decode, gemv=True, block_n=16, block_k=block_k, split_k=split_k)
    _check(out, x, w8, scale, bias)


def _gemv_row(n: int, k: int, block_k: int, split_k: int, silu: bool, seed: int, bias: bool):
    """A one-row GEMV problem (bf16) and the forced-GEMV keywords; with `silu` x is a [gate | up] row of 2K."""
    x, w8, scale, b = _problem(1, n, k, torch.bfloat16, seed=seed, bias=bias)
    if silu:
        x = torch.randn(1, 2 * k, generator=torch.Generator().manual_seed(seed)).to(x.device, x.dtype)
    kw = dict(gemv=True, block_n=16, block_k=block_k, split_k=split_k, act="silu_mul" if silu else None)
    return x, w8, scale, b, kw


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize(("n", "k", "block_k", "split_k"), [(40, 200, 32, 3), (17, 256, 64, 4), (64, 1024, 128, 2)])
def test_w8a16_gemv_last_split_reduce(n, k, block_k, split_k, silu, monkeypatch):
    """The split that finishes last reduces (one launch): the same output, bit for bit, as the separate reduce
    kernel, with ragged N and K; the arrival counters are all zero again afterwards (a second call is right too)."""
    import lragent.kernels.triton_fp8 as tf

    x, w8, scale, bias, kw = _gemv_row(n, k, block_k, split_k, silu, seed=n + split_k, bias=split_k % 2 == 1)
    monkeypatch.setattr(tf, "GEMV_LAST_SPLIT", False)
    two = w8a16_linear(x, w8, scale, bias, **kw)
    monkeypatch.setattr(tf, "GEMV_LAST_SPLIT", True)
    for _ in range(2):
        one = w8a16_linear(x, w8, scale, bias, **kw)
        assert torch.equal(one, two)
        assert not counters_of(tf.GEMV_COUNTERS_OWNER, x.device).any()


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize(("n", "k", "block_k", "split_k"), [(40, 200, 32, 1), (40, 200, 32, 3), (17, 256, 64, 4),
                                                            (16, 64, 64, 1)])  # fmt: skip
def test_w8a16_gemv_pdl_form_same_bits(n, k, block_k, split_k, silu, monkeypatch):
    """The GEMV's PDL form (first weight tile loaded before waiting for the kernel that writes x; on a GPU launched
    with programmatic dependent launch) computes the same bits as the plain one: ragged N and K, one tile per split,
    split-K, the SiLU prologue. On a GPU the waits are real; in the interpreter they are no-ops."""
    import lragent.kernels.triton_fp8 as tf

    x, w8, scale, bias, kw = _gemv_row(n, k, block_k, split_k, silu, seed=n + k + split_k, bias=split_k % 2 == 0)
    monkeypatch.setattr(tf, "GEMV_PDL", False)
    plain = w8a16_linear(x, w8, scale, bias, **kw)
    monkeypatch.setattr(tf, "GEMV_PDL", True)
    assert torch.equal(w8a16_linear(x, w8, scale, bias, **kw), plain)


@pytest.mark.parametrize(("n", "k"), [(20, 96), (8200, 48), (24, 8200)])
def test_w8a16_gemv_default_config(n, k):
    """A single row takes the GEMV by default, with the measured tiles (16 / 32 channels, 1,024 / 512-wide K steps,
    two splits for rows over 8192): ragged in both directions at each tile size."""
    assert gemv_config(4096, 4096) == (16, 1024, 8, 1) and gemv_config(28672, 4096) == (32, 512, 8, 1)
    assert gemv_config(4096, 14336) == (16, 1024, 8, 2)  # long rows: split in two
    x, w8, scale, bias = _problem(1, n, k, torch.bfloat16, seed=n, bias=True)
    _check(w8a16_linear(x, w8, scale, bias), x, w8, scale, bias)


# (N, K, BLOCK_K, split_k): K tiles per program odd and even, a ragged last tile, splits whose ranges hold an odd
# number of tiles (3, 3, 1 of 7), two tiles per split, a single tile, more splits than tiles
TILING_CASES = [(40, 200, 32, 1), (40, 192, 32, 1), (40, 160, 32, 1), (5, 40, 16, 1), (24, 20, 32, 1),
                (40, 200, 32, 3), (17, 256, 64, 2), (33, 224, 32, 2), (16, 100, 64, 8)]  # fmt: skip


@pytest.mark.parametrize("decode", DECODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "k", "block_k", "split_k"), TILING_CASES)
def test_w8a16_gemv_pdl_first_tile_tilings(n, k, block_k, split_k, dtype, decode, monkeypatch):
    """The PDL form takes each split's first K tile before the wait and the rest in the loop: every split's range
    is still covered exactly once, against the reference and bit for bit against the plain form, with and without
    the SiLU prologue, over odd / even / single tile counts, a ragged end and uneven splits."""
    import lragent.kernels.triton_fp8 as tf

    x, w8, scale, bias = _problem(1, n, k, dtype, seed=n + k + split_k, bias=split_k % 2 == 1)
    gate_up = _gate_up(k, dtype, seed=k)
    kw = dict(decode=decode, gemv=True, block_n=16, block_k=block_k, split_k=split_k)
    got = {}
    for pdl in (False, True):
        monkeypatch.setattr(tf, "GEMV_PDL", pdl)
        got[pdl] = (
            w8a16_linear(x, w8, scale, bias, **kw),
            w8a16_linear(gate_up, w8, scale, bias, act="silu_mul", **kw),
        )
    _check(got[True][0], x, w8, scale, bias)
    assert torch.equal(got[True][0], got[False][0]) and torch.equal(got[True][1], got[False][1])


def _gate_up(k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A [gate | up] row of 2K as the fused gate/up projection writes it, gates over SiLU's curved range."""
    gen = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(1, 2 * k, generator=gen)).to(DEVICE, dtype)


# (N, K, BLOCK_N, BLOCK_K, split_k): even and ragged N / K, split-K off and on, the default tiles (None)
SILU_CASES = [(72, 200, 32, 64, 1), (64, 256, 16, 128, 1), (40, 200, 16, 32, 3), (17, 256, 16, 64, 2),
              (5, 40, 16, 16, 1), (24, 1000, None, None, None)]  # fmt: skip


@pytest.mark.parametrize("decode", DECODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "k", "block_n", "block_k", "split_k"), SILU_CASES)
def test_w8a16_gemv_silu_mul_prologue(n, k, block_n, block_k, split_k, dtype, decode):
    """act="silu_mul": the GEMV reads the [gate | up] row and multiplies W by silu(gate) * up computed in its loads.
    It must equal `silu_mul` (the Triton kernel the MLP runs otherwise) followed by the same GEMV bit for bit (the
    activation is rounded to x's dtype at the same two points), and the dequantised reference on silu_mul's
    output; ragged N and K, split-K on and off, the default tiles, a 1-d row."""
    _, w8, scale, bias = _problem(1, n, k, dtype, seed=n * k, bias=n % 2 == 0)
    gate_up = _gate_up(k, dtype, seed=n + k)
    h = silu_mul(gate_up)
    kw = dict(decode=decode, gemv=True, block_n=block_n, block_k=block_k, split_k=split_k)
    fused = w8a16_linear(gate_up, w8, scale, bias, act="silu_mul", **kw)
    _check(fused, h, w8, scale, bias)
    assert torch.equal(fused, w8a16_linear(h, w8, scale, bias, **kw))
    flat = w8a16_linear(gate_up.view(-1), w8, scale, bias, act="silu_mul", **kw)
    assert flat.shape == (n,) and torch.equal(flat, fused.view(-1))


def test_silu_mul_prologue_only_for_single_rows():
    """The prologue lives in the GEMV only: several rows, the tiled kernel (gemv=False), an odd width or an unknown
    activation are refused (the caller runs `silu_mul` first)."""
    _, w8, scale, _ = _problem(1, 24, 64, torch.float32, seed=0, bias=False)
    row = _gate_up(64, torch.float32, seed=1)
    assert can_fuse_act(row, "silu_mul") and not can_fuse_act(row, "silu_mul", gemv=False)
    assert not can_fuse_act(row.expand(2, -1), "silu_mul") and not can_fuse_act(row[:, :-1], "silu_mul")
    with pytest.raises(ValueError, match="single row"):
        w8a16_linear(row.expand(3, -1), w8, scale, act="silu_mul")
    with pytest.raises(ValueError, match="act must be"):
        w8a16_linear(row, w8, scale, act="gelu")


def test_fp8_weight_linear_silu_mul_routing():
    """`Fp8Weight.linear_silu_mul` fuses a single row on the Triton path (a row view of a fused weight included)
    and declines (None) elsewhere: the reference path, more rows, a width that is not 2 x in_features."""
    w = torch.randn(48, 64, device=DEVICE) * 0.1
    fp8 = Fp8Weight.of(w, scaled_mm=False, triton_rows=4).rows(8, 40)
    gate_up = _gate_up(64, torch.float32, seed=2)
    got = fp8.linear_silu_mul(gate_up)
    assert got is not None
    torch.testing.assert_close(got, fp8.linear(silu_mul(gate_up)), rtol=0, atol=0)
    assert Fp8Weight.of(w, scaled_mm=False).linear_silu_mul(gate_up) is None  # triton_rows 0
    assert fp8.linear_silu_mul(gate_up.expand(2, -1)) is None
    assert fp8.linear_silu_mul(gate_up[:, :64]) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a16_default_tiles_and_views(dtype):
    """The automatic tile choice, a 3-d input, and a row view of a fused weight (its rows start mid-storage)."""
    x, w8, scale, _ = _problem(5, 96, 160, dtype, seed=7, bias=False)
    out = w8a16_linear(x.view(1, 5, 160), w8, scale)
    assert out.shape == (1, 5, 96)
    _check(out.view(5, 96), x, w8, scale, None)
    view = w8a16_linear(x, w8[40:72], scale[40:72])
    _check(view, x, w8[40:72], scale[40:72], None)
    assert torch.equal(view, w8a16_linear(x, w8[40:72].contiguous(), scale[40:72].contiguous()))
    assert torch.equal(w8a16_linear(x, w8.view(torch.uint8), scale), out.view(5, 96))  # bytes: "bits" decode
    empty = w8a16_linear(x[:0], w8, scale)
    assert empty.shape == (0, 96)


def test_config_occupies_the_sms():
    """Decode shapes of Llama-3.1-8B on 132 SMs: the measured decode tiles (`DECODE_TILES`) for 1-32 rows, K split
    only where the output tiles alone leave SMs idle, and then into enough programs for every SM; small N splits
    K; forced prefill sizes keep at most 8 KiB of weights and 16 KiB of x per step."""
    for m in (1, 8, 16, 32):
        for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (14336, 4096)):
            cfg = w8a16_config(m, n, k, 132)
            bn, bk, warps, stages = DECODE_TILES[cfg.block_m]
            assert (cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages) == (bn, bk, warps, stages), (m, n, cfg)
            tiles = triton.cdiv(n, cfg.block_n)
            assert (cfg.split_k == 1) == (tiles >= 132) and tiles * cfg.split_k >= 132, (m, n, cfg)
    big = w8a16_config(300, 4096, 4096, 132)  # forced "triton" on a prefill: M tiles, bounded weight / x tiles
    assert big.block_m == 64 and big.block_n * big.block_k <= 8192 and big.block_m * big.block_k * 2 <= 16384
    small = w8a16_config(4, 1024, 2048, 132)
    assert small.split_k > 1 and triton.cdiv(1024, small.block_n) * small.split_k >= 132
    assert small.k_per_split % small.block_k == 0 and small.k_per_split * small.split_k >= 2048
    assert w8a16_config(32, 4096, 4096, 132).block_m == 32
    assert w8a16_config(1, 4096, 4096, 132, x_bytes=4).block_k == 256  # float32 x: the same bytes of x per step
    assert w8a16_config(300, 4096, 4096, 132).block_m == 64  # forced "triton" on a prefill: M tiles


def test_routing_choice():
    assert triton_rows_for("auto", torch.device("cpu")) == 0  # CPU keeps the dequantise reference
    assert triton_rows_for("auto", torch.device("cuda", 0)) == TRITON_MAX_ROWS
    assert triton_rows_for("torch", torch.device("cuda", 0)) == 0
    assert triton_rows_for("triton", torch.device("cpu")) > 1 << 40
    with pytest.raises(ValueError, match="gemm"):
        triton_rows_for("cutlass", torch.device("cpu"))


def test_projection_forward_routes_by_rows(monkeypatch):
    """Fp8Weight.linear takes the Triton kernel up to `triton_rows` rows, the old path above; row views of a
    fused weight keep the routing."""
    import lragent.kernels.triton_fp8 as kernel_module

    calls: list[int] = []
    real = kernel_module.w8a16_linear

    def spy(x, *args, **kwargs):
        calls.append(x.numel() // x.shape[-1])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(kernel_module, "w8a16_linear", spy)
    w = torch.randn(48, 64, device=DEVICE) * 0.1
    fp8 = Fp8Weight.of(w, scaled_mm=False, triton_rows=4)
    layer = Fp8Linear(fp8.rows(16, 48), None)
    assert "triton w8a16 up to 4 rows, else dequant" in repr(layer)
    ref = Fp8Linear(Fp8Weight.of(w, scaled_mm=False).rows(16, 48), None)
    for rows in (1, 4, 5):
        x = torch.randn(rows, 64, device=DEVICE)
        torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)
    assert calls == [1, 4]


@gpu
def test_projection_picks_triton_on_cuda_for_small_m(monkeypatch):
    """quantize_model_fp8 under "auto" on CUDA: decode batches (<= TRITON_MAX_ROWS rows) run the kernel, q/k/v
    and gate/up fused weights included; a prefill runs the old path."""
    import lragent.kernels.triton_fp8 as kernel_module
    from lragent.model_config import ModelConfig
    from lragent.models.llama import linear
    from lragent.models.loader import empty_model
    from lragent.quant.fp8 import quantize_model_fp8

    config = ModelConfig.from_dict(
        {
            "model_type": "llama",
            "vocab_size": 300,
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "max_position_embeddings": 256,
        },
        name="tiny",
    )
    model = empty_model(config, 64, torch.bfloat16, DEVICE).eval()
    for p in model.parameters():
        p.data.normal_(0.0, 0.02)
    model.fuse_projections()
    quantize_model_fp8(model, gemm="auto")
    layer = model.model.layers[0]
    calls: list[int] = []
    real = kernel_module.w8a16_linear
    monkeypatch.setattr(kernel_module, "w8a16_linear", lambda x, *a, **k: calls.append(x.shape[0]) or real(x, *a, **k))
    for weight in (layer.self_attn.qkv_weight, layer.mlp.gate_up_weight):
        assert isinstance(weight, Fp8Weight) and weight.triton_rows == TRITON_MAX_ROWS
        x = torch.randn(3, weight.data.shape[1], device=DEVICE, dtype=torch.bfloat16)
        linear(x, weight)
        linear(torch.randn(TRITON_MAX_ROWS + 1, weight.data.shape[1], device=DEVICE, dtype=torch.bfloat16), weight)
    layer.mlp.down_proj(torch.randn(2, 512, device=DEVICE, dtype=torch.bfloat16))
    assert calls == [3, 3, 2]


@gpu
@pytest.mark.parametrize("m", [1, 8, 32])
def test_w8a16_llama_shapes_on_gpu(m):
    for n, k in ((6144, 4096), (4096, 14336), (1024, 4096)):
        x, w8, scale, _ = _problem(m, n, k, torch.bfloat16, seed=n + m, bias=False)
        _check(w8a16_linear(x, w8, scale), x, w8, scale, None)
        _check(w8a16_linear(x, w8.view(torch.uint8), scale), x, w8, scale, None)  # "bits" decode


@gpu
def test_w8a16_cuda_graph_capture():
    x, w8, scale, bias = _problem(2, 1024, 512, torch.bfloat16, seed=3, bias=True)
    want = w8a16_linear(x, w8, scale, bias)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = w8a16_linear(x, w8, scale, bias)
    x.copy_(torch.randn_like(x))
    want = w8a16_linear(x, w8, scale, bias)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)


@gpu
def test_engine_greedy_tokens_same_on_both_paths(tiny_llama, monkeypatch):
    """The engine with FP8 weights on the GPU (CUDA graphs): in float32, greedy tokens through the Triton W8A16 kernel
    equal those of the old path with exact activations (LRAGENT_FP8_GEMM=torch, dequantise + F.linear: the same
    products, summed in another order); in bf16 (where the random tiny model's near-ties can flip on rounding, as
    the first H200 run of an exact bf16 check showed) the first token's log-prob stays within 0.05 of the old
    path's and within 0.3 of `_scaled_mm`'s (which also quantises the activations)."""
    import lragent.quant.fp8 as fp8_module
    from lragent import LLM, SamplingParams

    model, adapters = tiny_llama
    prompts = [[(31 * i + 7 * j) % 900 + 20 for j in range(10 + i)] for i in range(4)]
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=True)
    outs = {}
    real_supported = fp8_module.scaled_mm_supported
    runs = (
        ("triton32", "auto", False, "float32"),
        ("dequant32", "torch", False, "float32"),
        ("triton", "auto", True, "bfloat16"),
        ("dequant", "torch", False, "bfloat16"),
        ("scaled_mm", "torch", True, "bfloat16"),
    )
    for name, gemm, scaled_mm, dtype in runs:
        monkeypatch.setattr(fp8_module, "FP8_GEMM", gemm)
        monkeypatch.setattr(fp8_module, "scaled_mm_supported", real_supported if scaled_mm else lambda d, t: False)
        llm = LLM(
            model=model,
            adapters=adapters,
            sharing="non_shared",
            kv_cache_bytes=8 << 20,
            max_model_len=256,
            warmup=False,
            device="cuda",
            dtype=dtype,
            quantization="fp8",
        )
        o_proj = llm.engine.model.model.layers[0].self_attn.o_proj
        assert o_proj.weight.triton_rows == (TRITON_MAX_ROWS if gemm == "auto" else 0)
        outs[name] = llm.generate(prompts, greedy, adapter="plan")
        del llm
        torch.cuda.empty_cache()
    assert [o.token_ids for o in outs["triton32"]] == [o.token_ids for o in outs["dequant32"]]
    for other, tol in (("dequant", 0.05), ("scaled_mm", 0.3)):
        first = [abs(a.logprobs[0] - b.logprobs[0]) for a, b in zip(outs["triton"], outs[other])]
        assert max(first) < tol, (other, first)


def _add_norm_row(k: int, dtype: torch.dtype, seed: int):
    """The attention output, the residual stream and the norm's weight of one row, as the decoder layer has them."""
    gen = torch.Generator().manual_seed(seed)
    x, res = torch.randn(1, k, generator=gen), 4 * torch.randn(1, k, generator=gen)
    weight = 1 + 0.2 * torch.randn(k, generator=gen)
    return x.to(DEVICE, dtype), res.to(DEVICE, dtype), weight.to(DEVICE, dtype)


# (N, K, BLOCK_N, BLOCK_K, split_k): ragged N / K (K not a power of two: the norm's block is padded), split-K off and
# on, one tile per split, the default tiles (None)
ADD_NORM_CASES = [(72, 200, 32, 64, 1), (64, 256, 16, 128, 1), (40, 200, 16, 32, 3), (17, 256, 16, 64, 2),
                  (5, 40, 16, 16, 1), (24, 1000, None, None, None)]  # fmt: skip


@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "k", "block_n", "block_k", "split_k"), ADD_NORM_CASES)
def test_w8a16_gemv_add_rms_norm_prologue(n, k, block_n, block_k, split_k, dtype, pdl, monkeypatch):
    """The gate/up GEMV with the residual add + RMSNorm as its prologue: the new residual equals `add_rms_norm`'s
    sum bit for bit (one program writes it), and the product equals that kernel's normalised row through the same
    GEMV (bit for bit in the interpreter, where both reduce the norm alike; within the GEMV's own tolerance on a
    GPU, where the two kernels may sum the squares in different orders), and the dequantised reference."""
    import lragent.kernels.triton_fp8 as tf
    from lragent.kernels.triton_fp8 import w8a16_add_rms_norm_linear
    from lragent.kernels.triton_fused import add_rms_norm

    monkeypatch.setattr(tf, "GEMV_PDL", pdl)
    _, w8, scale, _ = _problem(1, n, k, dtype, seed=n * k + 1, bias=False)
    x, res, weight = _add_norm_row(k, dtype, seed=n + k)
    h, total = add_rms_norm(x, res, weight, 1e-5)
    kw = dict(block_n=block_n, block_k=block_k, split_k=split_k)
    got, got_total = w8a16_add_rms_norm_linear(x, res, weight, 1e-5, w8, scale, **kw)
    assert torch.equal(got_total, total) and got.shape == (1, n)
    _check(got, h, w8, scale, None)
    if not CUDA:
        assert torch.equal(got, w8a16_linear(h, w8, scale, gemv=True, **kw))
    flat, flat_total = w8a16_add_rms_norm_linear(x.view(-1), res.view(-1), weight, 1e-5, w8, scale, **kw)
    assert flat.shape == (n,) and torch.equal(flat, got.view(-1)) and torch.equal(flat_total, total.view(-1))


def test_add_rms_norm_prologue_only_for_single_rows():
    """One row with a residual of its shape and dtype, on the GEMV path; else refused (the caller runs the norm)."""
    from lragent.kernels.triton_fp8 import can_fuse_add_norm, w8a16_add_rms_norm_linear

    _, w8, scale, _ = _problem(1, 24, 64, torch.float32, seed=0, bias=False)
    x, res, weight = _add_norm_row(64, torch.float32, seed=2)
    assert can_fuse_add_norm(x, res) and not can_fuse_add_norm(x, res, gemv=False)
    assert not can_fuse_add_norm(x, None) and not can_fuse_add_norm(x, res.double())
    assert not can_fuse_add_norm(x.expand(2, -1), res.expand(2, -1))
    with pytest.raises(ValueError, match="one row"):
        w8a16_add_rms_norm_linear(x.expand(2, -1), res.expand(2, -1), weight, 1e-5, w8, scale)
