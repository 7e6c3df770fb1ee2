"""Next-token choice for a whole batch at once, on the logits' device: no per-row Python, one host copy.

Per row: logit bias, repetition / presence / frequency penalties, then greedy, or temperature with top-k, top-p and
min-p, drawn by an exponential race (Gumbel-max) whose noise is a hash of (request seed, position, token id). A
seeded request therefore draws the same tokens whatever else is in its batch and whichever device runs it, and the
draw needs no generator state. `sample_reference` computes the same thing one row at a time in plain Python loops
over the candidates: the exact oracle the batched path is tested against.

Log-probabilities are those of the logits as given (after any structured-output mask, before bias, penalties,
temperature and truncation), as OpenAI's API reports them.

The device part has several implementations that draw the same tokens (`sample(..., impl=...)`, `resolve_impl`):
the torch ops below (the definition), the fused Triton top-k kernels (`lragent.kernels.triton_sampling`), and
either replayed from a captured CUDA graph (`lragent.engine.sampler_graph`). The CPU runs the torch ops.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

from lragent.sampling import SamplingParams

_MASK64 = (1 << 64) - 1


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MIX1, _MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _splitmix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on int64 tensors (multiplication wraps, as in uint64)."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def race_noise(row_keys: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """-log(-log u) (Gumbel) noise for each (row, token): u is 23 hashed bits of (row key, token id), float32.

    23 bits, not 24: (2^24 - 0.5) / 2^24 rounds to 1.0 in float32, whose noise is +inf (and a masked -inf logit
    plus +inf is NaN, which argmax would pick); with 23 bits u <= 1 - 2^-24 < 1, so the noise is finite."""
    z = _splitmix(row_keys[:, None] + tokens * _GOLDEN)
    u = (_shr(z, 41).to(torch.float32) + 0.5) * (1.0 / (1 << 23))
    return -torch.log(-torch.log(u))


def row_key(seed: int, position: int) -> int:
    """The noise key of one draw (int64): SplitMix64 of the request's seed and the position being drawn, in Python
    integers (bit for bit what `_splitmix` computes on tensors)."""
    z = (seed * _GOLDEN + position + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * (_MIX1 & _MASK64)) & _MASK64
    z = ((z ^ (z >> 27)) * (_MIX2 & _MASK64)) & _MASK64
    z ^= z >> 31
    return _signed(z)


class SampleResult(NamedTuple):
    tokens: list[int]
    logprobs: list[float]  # non-finite where the row's logits were broken (NaN, +inf, or nothing but -inf)
    top_logprobs: list[list[tuple[int, float]]]  # per row: its top_logprobs most likely (token, log-prob)


@dataclass
class SamplingBatch:
    """The sampling rows of one step as device tensors, built once per step (`build`)."""

    params: list[SamplingParams]
    greedy: torch.Tensor  # [B] bool
    temperature: torch.Tensor  # [B] (1 for greedy rows)
    top_k: torch.Tensor  # [B] int64, vocab size when off
    top_p: torch.Tensor  # [B]
    min_p: torch.Tensor  # [B]
    keys: torch.Tensor  # [B] int64 noise keys (seed, position)
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (rows, tokens, values) of every logit_bias
    penalties: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None
    all_greedy: bool
    truncates: bool  # some sampled row uses top-k, top-p or min-p
    max_top_k: int  # candidates kept before top-p / min-p (vocab size if a row has no top-k)
    top_logprobs: int  # the most alternatives a row asks for

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        seeds: list[int],
        positions: list[int],
        histories: list[list[int]] | None,
        prompt_lens: list[int] | None,
        vocab_size: int,
        device: torch.device,
        history: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> SamplingBatch:
        """`histories` (token ids so far) and `prompt_lens` are read only for rows with penalties; `history`: those
        rows' (seen, counts) already on the device (`PenaltyHistory`), instead of building them from the lists."""

        def t(values: list, dtype: torch.dtype) -> torch.Tensor:
            host = torch.tensor(values, dtype=dtype)
            return (host.pin_memory() if device.type == "cuda" else host).to(device, non_blocking=True)

        greedy = [p.greedy for p in params]
        top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        sampled = [p for p, g in zip(params, greedy) if not g]
        truncates = any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in sampled)
        keys = [row_key(s, pos) for s, pos in zip(seeds, positions)]
        return cls(
            params=params,
            greedy=t(greedy, torch.bool),
            temperature=t([1.0 if g else p.temperature for p, g in zip(params, greedy)], torch.float32),
            top_k=t(top_k, torch.int64),
            top_p=t([p.top_p for p in params], torch.float32),
            min_p=t([p.min_p for p in params], torch.float32),
            keys=t(keys, torch.int64),
            bias=_bias(params, vocab_size, t),
            penalties=_penalties(params, histories, prompt_lens, vocab_size, device, t, history),
            all_greedy=all(greedy),
            truncates=truncates,
            max_top_k=max([k for k, g in zip(top_k, greedy) if not g], default=vocab_size),
            top_logprobs=max([p.top_logprobs for p in params if p.logprobs], default=0),
        )


def _bias(params: list[SamplingParams], vocab: int, t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    entries = [(i, tok, b) for i, p in enumerate(params) for tok, b in p.logit_bias.items() if tok < vocab]
    if not entries:
        return None
    rows, toks, vals = zip(*entries)
    return t(list(rows), torch.int64), t(list(toks), torch.int64), t(list(vals), torch.float32)


def _penalties(params, histories, prompt_lens, vocab: int, device: torch.device, t, history=None):
    """(seen [B, V] bool over prompt + output, output counts [B, V], repetition, presence, frequency) or None.

    The penalised rows' histories go up as two flat (row, token) uploads and two scatters, not a pair per row (the
    reference of `PenaltyHistory`, whose rows `history` carries when given)."""
    if not any(p.penalized for p in params):
        return None
    rep = t([p.repetition_penalty for p in params], torch.float32)
    pres = t([p.presence_penalty for p in params], torch.float32)
    freq = t([p.frequency_penalty for p in params], torch.float32)
    if history is not None:
        return history[0], history[1], rep, pres, freq
    if histories is None or prompt_lens is None:
        return None
    b = len(params)
    seen_rows: list[int] = []
    seen_ids: list[int] = []
    out_rows: list[int] = []
    out_ids: list[int] = []
    for i, (p, hist, plen) in enumerate(zip(params, histories, prompt_lens)):
        if not p.penalized:
            continue
        ids = [x for x in hist if x < vocab]
        seen_rows += [i] * len(ids)
        seen_ids += ids
        out = [x for x in hist[plen:] if x < vocab]
        out_rows += [i] * len(out)
        out_ids += out
    flat = t([*seen_rows, *out_rows, *seen_ids, *out_ids], torch.int64)
    n_seen, n_out = len(seen_rows), len(out_rows)
    rows, ids = flat[: n_seen + n_out], flat[n_seen + n_out :]
    seen = torch.zeros(b, vocab, dtype=torch.bool, device=device)
    seen[rows[:n_seen], ids[:n_seen]] = True
    counts = torch.zeros(b, vocab, dtype=torch.float32, device=device)
    counts.index_put_((rows[n_seen:], ids[n_seen:]), torch.ones(n_out, device=device), accumulate=True)
    return seen, counts, rep, pres, freq


def process(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Bias and penalties applied to a copy of the logits (float32 [B, V])."""
    out = logits.clone()
    if batch.bias is not None:
        rows, toks, vals = batch.bias
        out.index_put_((rows, toks), vals, accumulate=True)
    if batch.penalties is not None:
        seen, counts, rep, pres, freq = batch.penalties
        rep = rep[:, None]
        out = torch.where(seen, torch.where(out > 0, out / rep, out * rep), out)
        out = out - freq[:, None] * counts - pres[:, None] * (counts > 0)
    return out


def _draw(scores: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The sampled rows' tokens: temperature, then top-k / top-p / min-p over the sorted candidates, then the
    race. scores [B, V] (processed logits)."""
    scaled = scores / batch.temperature[:, None]
    vocab = scaled.shape[-1]
    if batch.truncates:
        k = min(batch.max_top_k, vocab)
        cand, ids = torch.topk(scaled, k, dim=-1)  # sorted, descending
        rank = torch.arange(k, device=scaled.device)
        drop = rank[None, :] >= batch.top_k[:, None]
        probs = torch.softmax(cand.masked_fill(drop, float("-inf")), dim=-1)
        before = probs.cumsum(-1) - probs
        drop |= (before >= batch.top_p[:, None]) & (batch.top_p[:, None] < 1) & (rank[None, :] > 0)  # keep the crossing
        drop |= (probs < batch.min_p[:, None] * probs[:, :1]) & (rank[None, :] > 0)
        cand = cand.masked_fill(drop, float("-inf"))
    else:
        cand = scaled
        ids = torch.arange(vocab, device=scaled.device).expand_as(scaled)
    winner = (cand + race_noise(batch.keys, ids)).argmax(dim=-1, keepdim=True)
    return ids.gather(-1, winner)[:, 0]


IMPLS = ("auto", "torch", "graph", "triton", "triton+graph")
DEFAULT_IMPL = os.environ.get("LRAGENT_SAMPLER_IMPL", "auto")  # what `sample` runs when not told (see resolve_impl)
AUTO_FAST = "triton"  # what "auto" runs on CUDA for a top-k batch ("triton+graph" also captures it in a graph)
AUTO_GRAPH_MAX = 1 << 23  # "auto" graphs the torch path up to this many logits (its pool holds [B, V] temporaries)


def sample(logits: torch.Tensor, batch: SamplingBatch, impl: str | None = None) -> SampleResult:
    """logits [B, V] float32 -> a token per row, its log-probability, and the requested alternatives.

    A row whose logits are broken (NaN, +inf, or nothing but -inf) has a non-finite logsumexp and hence a
    non-finite chosen log-probability: the engine fails that request alone. Its draw runs on zeros so the batch
    cannot raise. `impl` (default `DEFAULT_IMPL`) picks how the device part runs; every choice draws the same
    tokens (`resolve_impl` says which run where)."""
    return sample_async(logits, batch, impl).result()


def sample_async(logits: torch.Tensor, batch: SamplingBatch, impl: str | None = None) -> PendingSample:
    """`sample` without waiting: the draws are queued on the device and on their way to the host."""
    chosen = resolve_impl(impl or DEFAULT_IMPL, logits, batch)
    if chosen in ("graph", "triton+graph"):
        from lragent.engine.sampler_graph import run_graph

        flat, rows = run_graph(logits, batch, triton=chosen == "triton+graph")
    else:
        flat, rows = device_sample(logits, batch, triton=chosen == "triton"), len(batch.params)
    return PendingSample(flat, rows, batch)


class PendingSample:
    """A step's draws between the device and the host.

    `tokens(index)` hands the drawn ids to the next step on the device, so that step can be queued before this one's
    tokens reach the host (async scheduling); `result()` waits for the host copy. The copy is queued at once into
    its own pinned buffer: the device tensor may be a sampler graph's static output, which the next replay
    overwrites, and a queued step never waits for the host to read the previous one's."""

    def __init__(self, flat: torch.Tensor, rows: int, batch: SamplingBatch):
        self.flat, self.rows, self.batch = flat, rows, batch
        self._event: torch.cuda.Event | None = None
        if flat.device.type == "cuda":
            self._host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            self._host.copy_(flat, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = flat.cpu()

    def tokens(self, index: list[int]) -> torch.Tensor:
        """The ids drawn for rows `index`, int64 on the device (to be read before the sampler runs again)."""
        if index == list(range(len(index))):
            return self.flat[: len(index)].to(torch.int64)
        rows = torch.tensor(index, dtype=torch.int64)
        if self.flat.is_cuda:
            rows = rows.pin_memory()  # a pageable upload could wait for the device, which runs the previous step
        return self.flat[rows.to(self.flat.device, non_blocking=True)].to(torch.int64)

    def result(self) -> SampleResult:
        if self._event is not None:
            self._event.synchronize()
        return _result(self._host.tolist(), self.rows, self.batch)


def resolve_impl(impl: str, logits: torch.Tensor, batch: SamplingBatch) -> str:
    """The implementation that runs: "torch", "triton", "graph" or "triton+graph".

    "triton" (the fused top-k kernels) serves batches whose sampled rows all have a top-k of at most
    `TOPK_CAP` (greedy rows too), float32 logits, on CUDA or under TRITON_INTERPRET=1; other batches run the torch
    path. "graph" (a captured CUDA graph per batch shape) serves CUDA batches without logit bias or penalties (their
    sparse inputs change shape every step); others run eagerly. "auto": the torch path on the CPU; on CUDA
    `AUTO_FAST` for a top-k batch, else the torch path, captured when graphable and at most `AUTO_GRAPH_MAX` logits."""
    if impl not in IMPLS:
        raise ValueError(f"unknown sampler impl {impl!r}; choose from {', '.join(IMPLS)}")
    cuda = logits.device.type == "cuda"
    graphable = cuda and batch.bias is None and batch.penalties is None
    fast = _triton_serves(logits, batch)
    if impl == "auto":
        if not cuda:
            return "torch"
        if fast:
            return AUTO_FAST if graphable else "triton"
        return "graph" if graphable and logits.numel() <= AUTO_GRAPH_MAX else "torch"
    name = "triton" if impl.startswith("triton") and fast else "torch"
    if impl.endswith("graph") and graphable:
        return "triton+graph" if name == "triton" else "graph"
    return name


def _triton_serves(logits: torch.Tensor, batch: SamplingBatch) -> bool:
    from lragent.kernels.triton_sampling import TOPK_CAP

    runs = logits.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    return (
        runs
        and logits.dtype == torch.float32
        and logits.stride(-1) == 1
        and (batch.all_greedy or batch.max_top_k <= TOPK_CAP)
    )


def device_sample(logits: torch.Tensor, batch: SamplingBatch, triton: bool = False) -> torch.Tensor:
    """The device part of `sample`, float64 [2B + 2kB]: tokens, their log-probs, then (k = batch.top_logprobs)
    the alternatives' ids and log-probs, rank-major. No host sync: a CUDA graph can capture it."""
    return _device_triton(logits, batch) if triton else _device_torch(logits, batch)


def _device_torch(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    lse = torch.logsumexp(logits, dim=-1)
    broken = ~torch.isfinite(lse)
    scores = process(torch.where(broken[:, None], torch.zeros_like(logits), logits), batch)
    chosen = scores.argmax(dim=-1)
    if not batch.all_greedy:
        chosen = torch.where(batch.greedy, chosen, _draw(scores, batch))
    chosen_lp = logits.gather(-1, chosen[:, None])[:, 0] - lse
    return torch.cat([chosen.double(), chosen_lp.double(), *_top_parts(logits, lse, batch.top_logprobs)])


def _top_parts(logits: torch.Tensor, lse: torch.Tensor, k: int) -> list[torch.Tensor]:
    if not k:
        return []
    top_v, top_i = torch.topk(logits, k, dim=-1)
    return [top_i.double().T.reshape(-1), (top_v - lse[:, None]).double().T.reshape(-1)]


def _device_triton(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The fused kernels (`lragent.kernels.triton_sampling`): two launches when there is no bias, no penalty and
    no top_logprobs; bias and penalties are applied first by `process`, as on the torch path."""
    from lragent.kernels.triton_sampling import kcap_for, topk_sample

    scores = lse = None
    if batch.bias is not None or batch.penalties is not None or batch.top_logprobs:
        lse = torch.logsumexp(logits, dim=-1)
    if batch.bias is not None or batch.penalties is not None:
        assert lse is not None
        broken = ~torch.isfinite(lse)
        scores = process(torch.where(broken[:, None], torch.zeros_like(logits), logits), batch)
    kcap = kcap_for(1 if batch.all_greedy else batch.max_top_k)
    out = topk_sample(
        logits, scores, batch.temperature, batch.greedy, batch.top_k, batch.top_p, batch.min_p, batch.keys, kcap
    )
    if not batch.top_logprobs:
        return out
    assert lse is not None
    return torch.cat([out, *_top_parts(logits, lse, batch.top_logprobs)])


def _result(host: list[float], rows: int, batch: SamplingBatch) -> SampleResult:
    """The host copy, laid out for `rows` rows (a padded graph batch has more than the batch), as a SampleResult."""
    n, k = len(batch.params), batch.top_logprobs
    tokens, lps = [int(x) for x in host[:n]], host[rows : rows + n]
    return SampleResult(tokens, lps, _alternatives(host[2 * rows :], batch.params, rows, k))


def _alternatives(flat: list[float], params: list[SamplingParams], n: int, k: int) -> list[list[tuple[int, float]]]:
    if not k:
        return [[] for _ in params]
    ids, vals = flat[: n * k], flat[n * k :]
    return [
        [(int(ids[j * n + i]), vals[j * n + i]) for j in range(p.top_logprobs)] if p.logprobs else []
        for i, p in enumerate(params)
    ]


# ---- the exact reference: one row at a time, Python loops over the candidates ------------------------------------
def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float = 0.0) -> torch.Tensor:
    """Mask everything outside the top-k tokens, outside the smallest set with probability mass >= top_p (the token
    that crosses it kept, and always the most likely one), and below min_p x the top probability."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0 or min_p > 0.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs < min_p * probs[..., :1]
        if top_p < 1.0:
            drop |= probs.cumsum(-1) - probs >= top_p
        drop[..., 0] = False  # always the most likely one (a top_p below float32's range rounds to 0)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_reference(
    logits: torch.Tensor,
    params: list[SamplingParams],
    seeds: list[int],
    positions: list[int],
    histories: list[list[int]] | None = None,
    prompt_lens: list[int] | None = None,
) -> list[int]:
    """The tokens `sample` must choose, one row at a time on the CPU in float32 (the batched path's arithmetic),
    the race run as a Python loop over the kept candidates."""
    out = []
    for i, p in enumerate(params):
        one = SamplingBatch.build([p], [seeds[i]], [positions[i]], _one(histories, i), _one(prompt_lens, i),
                                  logits.shape[-1], torch.device("cpu"))  # fmt: skip
        row = process(logits[i : i + 1].float().cpu(), one)[0]
        if p.greedy:
            out.append(int(row.argmax()))
            continue
        kept = filter_logits(row / p.temperature, p.top_k, p.top_p, p.min_p)
        key = torch.tensor([row_key(seeds[i], positions[i])])
        best, best_score = -1, None
        for tok in torch.nonzero(torch.isfinite(kept)).flatten().tolist():
            score = kept[tok] + race_noise(key, torch.tensor([tok]))[0, 0]
            if best_score is None or score > best_score:
                best, best_score = tok, score
        out.append(best)
    return out


def _one(values: list | None, i: int) -> list | None:
    return None if values is None else [values[i]]
