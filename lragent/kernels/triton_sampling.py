"""Fused top-k sampling: the sampler's truncation path (`lragent.engine.sampler._draw`) in two Triton kernels.

`torch.topk` over a 128k vocabulary plus ~20 small kernels (softmax, cumsum, masks, the hash of the race noise, the
log-prob gather, the concatenation for the host copy) cost ~1.4 ms at batch 32, most of it launches. Here:

1. `_chunk_kernel`, grid (rows, vocabulary chunks): per chunk the raw logits' max and sum of exponentials (the
   row's logsumexp is merged from them), and the chunk's best candidates of the temperature-scaled scores, found by
   k rounds of max-extraction over a packed int64 key (orderable float bits << 32 | inverted token id): one
   reduction gives the value and its id, and equal values rank the smaller id first, as `argmax` does.
2. `_pick_kernel`, grid (rows,): the row's top-k from the chunks' candidates (the row's k-th best is >= every
   chunk's k-th best, so each chunk's top k is enough), softmax over the kept, top-p (keeping the crossing token) and
   min-p cuts, the race noise (SplitMix64 of (row key, token id) in uint64, bit for bit `race_noise`), the winner,
   and the float64 (token, log-prob) pair written where the host copy reads it.

The arithmetic is the torch path's: IEEE division by the temperature, libdevice log / exp on CUDA (the functions
torch's kernels call), so the same candidates and the same noise decide the same winner; only float sums at a
top-p / min-p cut may round differently (as they already do between torch's CPU and CUDA kernels).
Greedy rows take one round (the argmax of the scores). A row whose logsumexp is not finite (NaN, +inf, nothing but
-inf) gets token 0 and a non-finite log-prob, as on the torch path; its request fails.
Under TRITON_INTERPRET=1 (CPU tests) numpy's log / exp stand in for libdevice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

TOPK_CAP = 128  # the largest top-k served here; larger (or no) top-k stays on the torch path


@triton.jit
def _log(x, PRECISE: tl.constexpr):
    if PRECISE:
        return libdevice.log(x)
    else:
        return tl.log(x)


@triton.jit
def _exp(x, PRECISE: tl.constexpr):
    if PRECISE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _pack(value, ids):
    """(float32 value, int32 id) -> int64 whose signed order is (value, then smaller id first)."""
    bits = value.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (key.to(tl.int64) << 32) | (0x7FFFFFFF - ids).to(tl.int64)


@triton.jit
def _unpack(packed):
    """The inverse of `_pack`: (float32 value, int32 id)."""
    key = (packed >> 32).to(tl.int32)
    bits = tl.where(key < 0, key ^ 0x7FFFFFFF, key)
    ids = 0x7FFFFFFF - (packed & 0x7FFFFFFF).to(tl.int32)
    return bits.to(tl.float32, bitcast=True), ids


@triton.jit
def _extract(packed, rounds, KCAP: tl.constexpr):
    """The `rounds` largest packed keys, descending, in a [KCAP] vector (the rest INT64_MIN)."""
    slots = tl.arange(0, KCAP)
    out = tl.full([KCAP], -9223372036854775808, tl.int64)
    for r in range(rounds):
        best = tl.max(packed, axis=0)
        out = tl.where(slots == r, best, out)
        packed = tl.where(packed == best, -9223372036854775808, packed)
    return out


@triton.jit
def _rounds(greedy_ptr, top_k_ptr, row, KCAP: tl.constexpr):
    """Candidates a row needs: 1 when greedy (its argmax), else its top-k."""
    greedy = tl.load(greedy_ptr + row)
    k = tl.minimum(tl.load(top_k_ptr + row), KCAP).to(tl.int32)
    return tl.where(greedy != 0, 1, k)


@triton.jit
def _chunk_kernel(
    logits_ptr,
    scores_ptr,
    temp_ptr,
    greedy_ptr,
    top_k_ptr,
    cand_ptr,
    stats_ptr,
    vocab,
    stride_logits,
    stride_scores,
    n_chunks,
    CHUNK: tl.constexpr,
    KCAP: tl.constexpr,
    HAS_SCORES: tl.constexpr,
    PRECISE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = cols < vocab
    x = tl.load(logits_ptr + row * stride_logits + cols, mask=valid, other=float("-inf")).to(tl.float32)
    # the raw logits' max and sum of exp (a chunk of only -inf sums to 0, not NaN; NaN / +inf make the sum NaN)
    m = tl.max(x, axis=0)
    shift = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(tl.where(valid, _exp(x - shift, PRECISE), 0.0), axis=0)
    stat = (row * n_chunks + chunk) * 2
    tl.store(stats_ptr + stat, m)
    tl.store(stats_ptr + stat + 1, s)
    if HAS_SCORES:
        x = tl.load(scores_ptr + row * stride_scores + cols, mask=valid, other=float("-inf")).to(tl.float32)
    scaled = tl.math.div_rn(x, tl.zeros_like(x) + tl.load(temp_ptr + row))
    packed = tl.where(valid, _pack(scaled, cols), -9223372036854775808)
    best = _extract(packed, _rounds(greedy_ptr, top_k_ptr, row, KCAP), KCAP)
    tl.store(cand_ptr + (row * n_chunks + chunk) * KCAP + tl.arange(0, KCAP), best)


@triton.jit
def _race_noise(row_key, ids, PRECISE: tl.constexpr):
    """`lragent.engine.sampler.race_noise` for one row's candidates: SplitMix64 in uint64, 23 bits, -log(-log u)."""
    z = row_key.to(tl.uint64, bitcast=True) + ids.to(tl.uint64) * 0x9E3779B97F4A7C15
    z = z + 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z = z ^ (z >> 31)
    u = ((z >> 41).to(tl.float32) + 0.5) * 1.1920928955078125e-07
    return -_log(-_log(u, PRECISE), PRECISE)


@triton.jit
def _logsumexp(stats_ptr, row, n_chunks, NCP2: tl.constexpr, PRECISE: tl.constexpr):
    """The row's logsumexp merged from its chunks' (max, sum of exp)."""
    c = tl.arange(0, NCP2)
    base = stats_ptr + row * n_chunks * 2 + c * 2
    m = tl.load(base, mask=c < n_chunks, other=float("-inf"))
    s = tl.load(base + 1, mask=c < n_chunks, other=0.0)
    top = tl.max(m, axis=0)
    shift = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(tl.where(s == 0.0, 0.0, s * _exp(m - shift, PRECISE)), axis=0)
    return shift + _log(total, PRECISE)


@triton.jit
def _pick_kernel(
    logits_ptr,
    greedy_ptr,
    top_k_ptr,
    top_p_ptr,
    min_p_ptr,
    keys_ptr,
    cand_ptr,
    stats_ptr,
    out_ptr,
    stride_logits,
    n_chunks,
    n_rows,
    NCP2: tl.constexpr,
    KCAP: tl.constexpr,
    HAS_SCORES: tl.constexpr,
    PRECISE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    lse = _logsumexp(stats_ptr, row, n_chunks, NCP2, PRECISE)
    every = tl.arange(0, NCP2 * KCAP)
    packed = tl.load(cand_ptr + row * n_chunks * KCAP + every, mask=every < n_chunks * KCAP, other=-9223372036854775808)
    rounds = _rounds(greedy_ptr, top_k_ptr, row, KCAP)
    value, ids = _unpack(_extract(packed, rounds, KCAP))
    slots = tl.arange(0, KCAP)
    kept = slots < rounds
    value = tl.where(kept, value, float("-inf"))
    # softmax over the kept candidates, then the top-p / min-p cuts (rank 0 always kept)
    e = tl.where(kept, _exp(value - tl.max(value, axis=0), PRECISE), 0.0)
    probs = tl.math.div_rn(e, tl.zeros_like(e) + tl.sum(e, axis=0))
    before = tl.cumsum(probs, axis=0) - probs
    top_p = tl.load(top_p_ptr + row)
    drop = before >= tl.where(top_p < 1.0, top_p, float("inf"))  # top-p 1 is off
    drop |= probs < tl.load(min_p_ptr + row) * tl.max(probs, axis=0)
    drop = (drop & (slots > 0)) | (slots >= rounds)
    race = tl.where(drop, float("-inf"), value + _race_noise(tl.load(keys_ptr + row), ids, PRECISE))
    winner = tl.argmax(race, axis=0)
    first = tl.sum(tl.where(slots == 0, ids, 0), axis=0)
    drawn = tl.sum(tl.where(slots == winner, ids, 0), axis=0)
    token = tl.where(tl.load(greedy_ptr + row) != 0, first, drawn)
    if not HAS_SCORES:  # broken rows' scores were the raw logits: token 0, as torch's draw on zeros gives greedy
        token = tl.where((lse == lse) & (tl.abs(lse) < float("inf")), token, 0)
    logprob = tl.load(logits_ptr + row * stride_logits + token).to(tl.float32) - lse
    tl.store(out_ptr + row, token.to(tl.float64))
    tl.store(out_ptr + n_rows + row, logprob.to(tl.float64))


def kcap_for(max_top_k: int) -> int:
    """The candidate slots per row (a power of two, 16..TOPK_CAP) for a batch's largest top-k."""
    return max(16, triton.next_power_of_2(max(1, min(max_top_k, TOPK_CAP))))


def chunk_for(vocab: int) -> int:
    """Vocabulary columns per program of the first kernel: about 32 chunks a row, 1024..8192 wide."""
    return min(8192, max(1024, triton.next_power_of_2(triton.cdiv(vocab, 32))))


def topk_sample(
    logits: torch.Tensor,
    scores: torch.Tensor | None,
    temperature: torch.Tensor,
    greedy: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    keys: torch.Tensor,
    kcap: int,
    out: torch.Tensor | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """float64 [2 * rows]: each row's token, then each row's log-prob (raw logit - logsumexp of the raw logits).

    logits [rows, V] are the raw logits; `scores` (same shape) the biased / penalised ones the draw uses, None when
    they are the logits. Greedy rows (bool) take the scores' argmax; the others draw among their top-k (1..kcap,
    one per row in `top_k`) with top-p, min-p and the race noise of `keys`. `chunk` (a power of two) only for tests."""
    rows, vocab = logits.shape
    if kcap > TOPK_CAP or kcap & (kcap - 1):
        raise ValueError(f"kcap must be a power of two <= {TOPK_CAP}, got {kcap}")
    if logits.stride(-1) != 1 or (scores is not None and scores.stride(-1) != 1):
        raise ValueError("topk_sample needs rows with unit stride")
    chunk = chunk or chunk_for(vocab)
    n_chunks = triton.cdiv(vocab, chunk)
    device = logits.device
    cand = torch.empty(rows, n_chunks, kcap, dtype=torch.int64, device=device)
    stats = torch.empty(rows, n_chunks, 2, dtype=torch.float32, device=device)
    out = torch.empty(2 * rows, dtype=torch.float64, device=device) if out is None else out
    if rows == 0:
        return out
    precise = device.type == "cuda"
    flags = greedy.view(torch.uint8)
    src = logits if scores is None else scores
    _chunk_kernel[(rows, n_chunks)](
        logits, src, temperature, flags, top_k, cand, stats, vocab, logits.stride(0), src.stride(0), n_chunks,
        CHUNK=chunk, KCAP=kcap, HAS_SCORES=scores is not None, PRECISE=precise, num_warps=8 if chunk >= 4096 else 4,
    )  # fmt: skip
    _pick_kernel[(rows,)](
        logits, flags, top_k, top_p, min_p, keys, cand, stats, out, logits.stride(0), n_chunks, rows,
        NCP2=triton.next_power_of_2(n_chunks), KCAP=kcap, HAS_SCORES=scores is not None, PRECISE=precise,
        num_warps=4 if n_chunks * kcap <= 2048 else 8,
    )  # fmt: skip
    return out
