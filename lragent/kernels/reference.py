"""Flash-LoRA-Attention in plain PyTorch: the CPU path and the oracle for the Triton kernels.

The adapter part of the values is never expanded: O = P V_base + s (P R) B, with R the rank-r LR cache. Where keys
are shared with k_proj adapters (`KeyLR`) each key read is rebuilt as K_base + s RoPE_p(R_k B_k) of the reader.
"""

from __future__ import annotations

import torch

from lragent.cache.kv_cache import KVCache
from lragent.kernels.backend import AttentionBackend, KeyLR
from lragent.kernels.metadata import AttentionMetadata

SCORE_ELEMENTS = 1 << 28  # the most attention scores `lora_attention` holds at once (1 GiB in float32)


def lora_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v_base: torch.Tensor,
    lr: torch.Tensor | None,
    b_up: torch.Tensor | None,
    lora_scale: float,
    sm_scale: float,
) -> torch.Tensor:
    """One sequence. q [Lq, Hq, d]; k, v_base [Lk, Hkv, d]; lr [Lk, r]; b_up [r, Hkv, d].

    Query j sits at absolute position Lk - Lq + j and sees keys up to it (causal over the new tokens).
    Scores and softmax run in float32 (or the input's dtype if wider). Long prompts go through in query chunks of
    at most SCORE_ELEMENTS scores (each row's softmax is its own, so the result is the same): the torch backend
    serves whole 8k-token chunks over 33k-token contexts (droidspeak's trace) without a 30 GiB score matrix."""
    lq, lk = q.shape[0], k.shape[0]
    rows = max(1, SCORE_ELEMENTS // (q.shape[1] * lk))
    if lq <= rows:
        return _lora_attention(q, k, v_base, lr, b_up, lora_scale, sm_scale)
    outs = []
    for a in range(0, lq, rows):
        end = lk - lq + min(a + rows, lq)  # the chunk's last query sees keys up to here
        part_lr = lr[:end] if lr is not None else None
        outs.append(_lora_attention(q[a : a + rows], k[:end], v_base[:end], part_lr, b_up, lora_scale, sm_scale))
    return torch.cat(outs)


def _lora_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v_base: torch.Tensor,
    lr: torch.Tensor | None,
    b_up: torch.Tensor | None,
    lora_scale: float,
    sm_scale: float,
) -> torch.Tensor:
    lq, hq, d = q.shape
    lk, hkv, _ = k.shape
    group = hq // hkv
    acc = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(acc).view(lq, hkv, group, d).permute(1, 2, 0, 3)  # [Hkv, G, Lq, d]
    scores = torch.einsum("hgqd,khd->hgqk", qg, k.to(acc)) * sm_scale
    key_pos = torch.arange(lk, device=q.device)
    query_pos = torch.arange(lk - lq, lk, device=q.device)
    scores.masked_fill_(key_pos[None, :] > query_pos[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("hgqk,khd->hgqd", probs, v_base.to(acc))
    if lr is not None and b_up is not None:
        pr = torch.einsum("hgqk,kr->hgqr", probs, lr.to(acc))  # rank-r accumulator
        out = out + lora_scale * torch.einsum("hgqr,rhd->hgqd", pr, b_up.to(acc))
    return out.permute(2, 0, 1, 3).reshape(lq, hq, d).to(q.dtype)


def naive_lora_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v_base: torch.Tensor,
    lr: torch.Tensor | None,
    b_up: torch.Tensor | None,
    lora_scale: float,
    sm_scale: float,
) -> torch.Tensor:
    """The obvious way: materialise V = V_base + s R B, then causal attention. Only for tests and benchmarks."""
    v = v_base if lr is None else v_base + lora_scale * torch.einsum("kr,rhd->khd", lr, b_up)
    lq, hq, d = q.shape
    lk, hkv, _ = k.shape
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * sm_scale
    mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)


def lr_slice_stride(lr_width: int, value_up: torch.Tensor) -> int:
    """Columns between two adapter slots' slices of an LR row: 0 when every row is one adapter's R (each sequence
    reads columns 0..r), r when the row stacks every slot's R (STACKED_LR: slot s reads (s - 1) r .. s r).
    value_up: [S, r, ...] for the S slots (slot 0: no adapter)."""
    return lr_row_layout(lr_width, value_up.shape[1], value_up.shape[0] - 1, key_lr=False)[0]


def lr_row_layout(lr_width: int, rank: int, slots: int, key_lr: bool) -> tuple[int, int]:
    """(slice stride, key column) of an LR row: see `lr_slice_stride`; with `key_lr` a row is [R_v | R_k] and R_k
    starts at column `rank`."""
    if key_lr:
        if lr_width != 2 * rank:
            raise ValueError(f"an LR row of width {lr_width} is not [R_v | R_k] of rank {rank} (key LR)")
        return 0, rank
    if lr_width == rank:
        return 0, 0
    if lr_width != rank * slots:
        raise ValueError(f"an LR row of width {lr_width} is neither rank {rank} nor {slots} slots of it (stacked)")
    return rank, 0


def add_key_lora(
    k: torch.Tensor,
    r_k: torch.Tensor,
    k_up: torch.Tensor,
    scale: torch.Tensor | float,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> torch.Tensor:
    """K_base + s RoPE(R_k B_k), in float32 (or wider): k [..., L, Hkv, d]; r_k [..., L, r]; k_up [..., r, Hkv, d];
    cos / sin [L, d] (the keys' positions); scale a float or [..., 1, 1, 1]. Rows of r_k that must not count are
    zero (a NaN there would leak through 0 * NaN)."""
    acc = torch.promote_types(k.dtype, torch.float32)
    u = torch.einsum("...lr,...rhd->...lhd", r_k.to(acc), k_up.to(acc))
    half = u.shape[-1] // 2
    rotated = torch.cat([-u[..., half:], u[..., :half]], dim=-1)
    return k.to(acc) + scale * (u * cos[:, None] + rotated * sin[:, None])


def gather_positions(block_table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Flat pool slots of positions 0..length-1 of one sequence."""
    pos = torch.arange(length, device=block_table.device)
    return block_table[pos // block_size].long() * block_size + pos % block_size


def batched_decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    lrs: torch.Tensor | None,
    value_up: torch.Tensor | None,
    lora_scaling: torch.Tensor,
    meta: AttentionMetadata,
    block_size: int,
    key_lr: KeyLR | None = None,
) -> torch.Tensor:
    """All sequences of a decode step at once (one query token each), contexts padded to the longest and masked.

    keys/values: flat pools [slots, Hkv, d]; lrs: flat LR pool [slots, width] (width r, or r per slot when stacked:
    each sequence reads its own slice; [R_v | R_k] with `key_lr`). Same math as `lora_attention`.
    """
    b, hq, d = query.shape
    hkv = keys.shape[1]
    acc = torch.promote_types(query.dtype, torch.float32)
    longest = max(meta.context_lens)
    pos = torch.arange(longest, device=query.device)
    valid = pos[None, :] < meta.context_lens_t[:, None].long()  # [B, L]

    def slots(tables: torch.Tensor) -> torch.Tensor:
        blocks = tables[:, pos // block_size].long().clamp_min(0)
        return blocks * block_size + pos % block_size

    idx = slots(meta.base_block_tables)
    pad = ~valid[:, :, None]  # padding rows may hold anything (even NaN): zero them, 0 * NaN would leak
    seq_slots = meta.seq_lora_slots
    k_read = keys[idx]
    key_up = None if key_lr is None else key_lr.up
    ups = value_up if value_up is not None else key_up
    rows = stride = key_col = None
    unread = pad | (seq_slots == 0)[:, None, None]  # slot 0 reads no LR
    if lrs is not None and ups is not None:
        assert meta.lr_block_tables is not None, "an LR pool comes with LR block tables"
        rows = lrs[slots(meta.lr_block_tables)]  # [B, L, width]
        stride, key_col = lr_row_layout(rows.shape[-1], ups.shape[1], ups.shape[0] - 1, key_lr is not None)
    if key_lr is not None and key_up is not None and rows is not None and key_col is not None:
        rank = key_up.shape[1]
        r_k = rows[..., key_col : key_col + rank].to(acc).masked_fill(unread, 0.0)
        scale = lora_scaling[seq_slots].to(acc)[:, None, None, None]
        k_up = key_up[seq_slots].view(b, rank, hkv, d)
        k_read = add_key_lora(k_read, r_k, k_up, scale, key_lr.cos[pos], key_lr.sin[pos])
    qg = query.to(acc).view(b, hkv, hq // hkv, d)
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k_read.to(acc)) * d**-0.5
    probs = torch.softmax(scores.masked_fill(~valid[:, None, None, :], float("-inf")), dim=-1)
    out = torch.einsum("bhgl,blhd->bhgd", probs, values[idx].to(acc).masked_fill(pad[..., None], 0.0))
    if value_up is not None and rows is not None:
        rank = value_up.shape[1]
        lr = rows[..., :rank]
        if stride:  # each sequence's own slice of the stacked rows
            cols = (seq_slots - 1).clamp_min(0)[:, None] * stride + torch.arange(rank, device=rows.device)
            lr = rows.gather(2, cols[:, None, :].expand(b, longest, rank))
        lr = lr.to(acc).masked_fill(unread, 0.0)
        pr = torch.einsum("bhgl,blr->bhgr", probs, lr)
        b_up = value_up[meta.seq_lora_slots].view(b, -1, hkv, d).to(acc)
        scale = lora_scaling[meta.seq_lora_slots].to(acc)[:, None, None, None]
        out = out + scale * torch.einsum("bhgr,brhd->bhgd", pr, b_up)
    return out.reshape(b, hq, d).to(query.dtype)


def cascade_decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    lrs: torch.Tensor | None,
    value_up: torch.Tensor | None,
    lora_scaling: torch.Tensor,
    meta: AttentionMetadata,
    block_size: int,
    key_lr: KeyLR | None = None,
) -> torch.Tensor:
    """`batched_decode_attention` by the cascade route (`meta.cascade`, the oracle of the cascade kernels): each
    row's shared keys are read through its group's first member's block tables, its own keys from `suffix_start`
    through its own; each part gives a normalised partial (P V_base, P R over the row's LR slice) and its
    log-sum-exp, merged by log-sum-exp before s (P R) B. Same pools and layouts as `batched_decode_attention`."""
    plan = meta.cascade
    assert plan is not None, "give metadata with a cascade plan"
    starts = plan.suffix_start.tolist()
    shared_row = list(range(meta.num_seqs))
    for members, _ in plan.groups:
        for i in members:
            shared_row[i] = members[0]
    slots = meta.seq_lora_slots.tolist()
    out = torch.empty_like(query)
    for i, ctx in enumerate(meta.context_lens):
        parts = [
            _decode_part(query[i], shared_row[i], 0, starts[i], slots[i], keys, values, lrs, value_up, lora_scaling,
                         meta, block_size, key_lr),
            _decode_part(query[i], i, starts[i], ctx, slots[i], keys, values, lrs, value_up, lora_scaling, meta,
                         block_size, key_lr),
        ]  # fmt: skip
        lse = torch.stack([p[2] for p in parts])  # [2, Hq]
        weight = torch.softmax(lse, dim=0).nan_to_num(0.0)  # a part without keys (-inf) weighs 0
        o = sum(w[:, None] * p[0] for w, p in zip(weight, parts))
        if parts[0][1] is not None and value_up is not None:
            pr = sum(w[:, None] * p[1] for w, p in zip(weight, parts))
            hq, hkv, d = query.shape[1], keys.shape[1], keys.shape[2]
            b_up = value_up[slots[i]].view(-1, hkv, d).to(pr.dtype)
            term = torch.einsum("hgr,rhd->hgd", pr.view(hkv, hq // hkv, -1), b_up).reshape(hq, d)
            o = o + lora_scaling[slots[i]].to(pr.dtype) * term
        out[i] = o.to(query.dtype)
    return out


def _decode_part(q, table_row, lo, hi, slot, keys, values, lrs, value_up, lora_scaling, meta, block_size, key_lr):
    """One decode row's (P V_base [Hq, d], P R [Hq, r] or None, log-sum-exp [Hq]) over positions lo..hi-1 read
    through the block tables of batch row `table_row` (softmax normalised within the part)."""
    hq, d = q.shape
    hkv = keys.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    pos = torch.arange(lo, hi, device=q.device)
    idx = gather_positions(meta.base_block_tables[table_row], hi, block_size)[lo:]
    k = keys[idx]
    key_up = None if key_lr is None else key_lr.up
    ups = value_up if value_up is not None else key_up
    rows = None
    if lrs is not None and ups is not None and slot != 0:
        assert meta.lr_block_tables is not None, "an LR pool comes with LR block tables"
        rows = lrs[gather_positions(meta.lr_block_tables[table_row], hi, block_size)[lo:]]
        stride, key_col = lr_row_layout(rows.shape[-1], ups.shape[1], ups.shape[0] - 1, key_lr is not None)
        if key_lr is not None and key_up is not None:
            r_k = rows[:, key_col : key_col + key_up.shape[1]]
            k_up = key_up[slot].view(-1, hkv, d)
            k = add_key_lora(k, r_k, k_up, float(lora_scaling[slot]), key_lr.cos[pos], key_lr.sin[pos])
        if value_up is not None:
            col = (slot - 1) * stride
            rows = rows[:, col : col + value_up.shape[1]]
    scores = torch.einsum("hgd,lhd->hgl", q.to(acc).view(hkv, hq // hkv, d), k.to(acc)) * d**-0.5
    lse = torch.logsumexp(scores, dim=-1)  # -inf without keys
    probs = torch.exp(scores - lse[..., None])
    o = torch.einsum("hgl,lhd->hgd", probs, values[idx].to(acc)).reshape(hq, d)
    pr = None
    if value_up is not None:
        pr = torch.zeros(hq, value_up.shape[1], dtype=acc, device=q.device)
        if rows is not None:
            pr = torch.einsum("hgl,lr->hgr", probs, rows.to(acc)).reshape(hq, -1)
    return o, pr, lse.reshape(hq)


def _mark(cache: KVCache, pool: str, slots: torch.Tensor, bad: torch.Tensor) -> None:
    """Flag the blocks that received a non-finite row (caches without flag arrays, e.g. kernel tests, skip it)."""
    if getattr(cache, "flags", None) is not None:
        cache.mark_nonfinite(pool, slots, bad)


class TorchReferenceBackend(AttentionBackend):
    """Exact in float32/float64; decode steps run batched, prefill loops over sequences. Kernels must match it."""

    name = "torch"
    supports_layer_pools = True

    def store(self, cache, layer, key, value, lr, meta) -> None:
        """Write the entries; mark the blocks that received a non-finite one (as stored, after the cast)."""
        if key is not None and key.shape[0]:
            slots = meta.base_slots.long()
            key, value = key.to(cache.key[layer].dtype), value.to(cache.value[layer].dtype)
            cache.key[layer].view(-1, *key.shape[1:]).index_copy_(0, slots, key)
            cache.value[layer].view(-1, *value.shape[1:]).index_copy_(0, slots, value)
            bad = ~(key.flatten(1).isfinite().all(1) & value.flatten(1).isfinite().all(1))
            _mark(cache, "kv", slots, bad)
        if lr is not None and cache.lr is not None:
            slots = meta.lr_slots.long()
            lr = lr.to(cache.lr[layer].dtype)
            cache.lr[layer].view(-1, lr.shape[-1]).index_copy_(0, slots, lr)
            _mark(cache, "lr", slots, ~lr.isfinite().all(1))

    def attend(
        self,
        cache: KVCache,
        layer: int,
        query: torch.Tensor,
        value_up: torch.Tensor | None,
        lora_scaling: torch.Tensor,
        meta: AttentionMetadata,
        key_lr: KeyLR | None = None,
    ) -> torch.Tensor:
        bs, hkv, d = cache.block_size, cache.num_kv_heads, cache.head_dim
        keys = cache.key[layer].view(-1, hkv, d)
        values = cache.value[layer].view(-1, hkv, d)
        key_up = None if key_lr is None else key_lr.up
        ups = value_up if value_up is not None else key_up  # what sets the rank and the slot count
        lrs = None if cache.lr is None or ups is None else cache.lr[layer].view(-1, cache.lr_rank)
        if meta.is_decode:
            return batched_decode_attention(query, keys, values, lrs, value_up, lora_scaling, meta, bs, key_lr)
        stride, key_col = (0, 0)
        if lrs is not None and ups is not None:
            stride, key_col = lr_row_layout(lrs.shape[-1], ups.shape[1], ups.shape[0] - 1, key_lr is not None)
        out = torch.empty_like(query)
        starts = meta.query_start.tolist()
        slots = meta.seq_lora_slots.tolist()
        for i, ctx_len in enumerate(meta.context_lens):
            q = query[starts[i] : starts[i + 1]]
            idx = gather_positions(meta.base_block_tables[i], ctx_len, bs)
            k = keys[idx]
            lr = b_up = None
            scale = 0.0
            if lrs is not None and ups is not None and slots[i] != 0:
                assert meta.lr_block_tables is not None, "an LR pool comes with LR block tables"
                rows = lrs[gather_positions(meta.lr_block_tables[i], ctx_len, bs)]
                scale = float(lora_scaling[slots[i]])
                if value_up is not None:
                    col = (slots[i] - 1) * stride  # the sequence's own slice of a stacked row (STACKED_LR)
                    lr, b_up = rows[:, col : col + value_up.shape[1]], value_up[slots[i]].view(-1, hkv, d)
                if key_lr is not None and key_up is not None:
                    r_k = rows[:, key_col : key_col + key_up.shape[1]]
                    k_up = key_up[slots[i]].view(-1, hkv, d)
                    k = add_key_lora(k, r_k, k_up, scale, key_lr.cos[:ctx_len], key_lr.sin[:ctx_len])
            out[starts[i] : starts[i + 1]] = lora_attention(q, k, values[idx], lr, b_up, scale, d**-0.5)
        return out
