"""Cascade (shared-prefix) decode: keys several decode rows share are read once per step for all of them.

When running sequences share cached prefix blocks (agents of one trajectory over one long context, `n > 1` samples
of a prompt, parallel tool branches), split-KV decode reads the whole shared context once per sequence. Here a
decode step is cut in two:

- shared part: per group of rows whose block tables start with the same run of block ids, one launch computes
  attention of all the group's query rows (members x the G query heads of a kv head) against each shared key tile
  as a small matmul (`tl.dot`, tensor cores), leaving per-row partials (acc_v = P V_base, acc_r = P R, max, sum);
- suffix: every row's own keys (from the end of its group's shared run; all of them outside any group) with the
  same kernel, each row a group of one;
- merge: per (row, q head) the partials of both are combined by log-sum-exp, then `s acc_r B_g` of the row's own
  adapter is added, exactly as plain decode does after its splits.

The LR term stays per reader: acc_r is accumulated over the LR row's columns that any reader may use (the value
part, or every slot's slice of a stacked row) and each row picks its own slice in the merge. Valid only where the
shared blocks hold the same tensors for every member: `plan_cascade` requires identical block ids in every pool the
step reads (so NON_SHARED groups only rows of one adapter, BASE_SHARED only rows with the same LR blocks, while
BASE_LR_SHARED / STACKED_LR / FULL_SHARED group across adapters). Two layouts fall back to plain decode per layer
(`cascade_supported`): keys rebuilt per reader (key LR, k_proj adapters) when a group mixes adapter slots, since
each reader's B_k makes its keys differ; and stacked rows wider than `MAX_PR_COLUMNS`, whose acc_r would not fit.

Fixed shape, so decode steps with cascade groups replay CUDA graphs: a `CascadePlan` is a handful of int32 arrays
with a fixed number of group slots (`capacity`) and host bounds (members, shared and own tokens) that alone set the
launches' grids and split counts; programs of empty group slots, of row tiles past a group's members and of splits
past a group's shared length do no work, and each split's key range is computed in the kernel from the device
lengths. An eager step's plan has its own groups as capacity (`plan_cascade`); a captured graph of B rows gets a
`StaticCascadePlan`'s: MAX_GROUPS slots, every bound at its largest, its arrays rewritten in place before each
replay. Rows in no group are plain decode inside the same launches (the suffix pass over their whole context). The
graph runner captures this cascade variant of each decode bucket beside the plain one and replays it when the
step's groups fit (`StaticCascadePlan.fits`: at most MAX_GROUPS; mixed adapter slots only if no layer's choice
depended on them at capture); other steps with groups run eagerly through the same kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

from lragent.kernels.backend import KeyLR
from lragent.kernels.metadata import BatchRows, CascadePlan
from lragent.kernels.triton_attention import (
    LOG2E,
    _add_key_lora,
    _dot_precision,
    _load_key_up,
    _num_sms,
    _Pools,
    _value_up_cols,
)

MAX_PR_COLUMNS = 128  # widest acc_r a program keeps (a stacked row of more slots x rank falls back to plain decode)
DEFAULT_MIN_SHARED_TOKENS = 1024  # below this a group's saved reads do not pay for the extra launches
MAX_GROUPS = 8  # group slots of a captured decode graph's cascade plan (a step with more groups runs eagerly)


@dataclass(frozen=True)
class CascadeOptions:
    """When rows form a group: at least `min_seqs` rows sharing at least `min_blocks` whole blocks."""

    block_size: int
    min_blocks: int
    min_seqs: int = 2

    @classmethod
    def for_tokens(
        cls, block_size: int, min_tokens: int = DEFAULT_MIN_SHARED_TOKENS, min_seqs: int = 2
    ) -> CascadeOptions:
        return cls(block_size, max(1, -(-min_tokens // block_size)), min_seqs)


# ------------------------------------------------------------------------------------------------------------
# planning (host): groups from the block tables the runner already holds
# ------------------------------------------------------------------------------------------------------------
def _common_blocks(a: list[int], b: list[int], limit: int, lo: int = 0) -> int:
    """Length of the common leading run of a and b, at most `limit`, given a[:lo] == b[:lo]: slice comparisons run
    in C, and the binary search compares each element about twice (a Python loop over a 32k-token table costs
    ~100 us a pair)."""
    if a[lo:limit] == b[lo:limit]:
        return max(lo, limit)
    hi = limit  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class PrefixMemo:
    """Common leading runs of pairs of block lists, carried from one decode step to the next, so a step compares
    only the entries its rows added (16 rows over a 32k-token prefix: ~0.4 ms of slice comparisons a step without).
    Valid because a block list only grows in place: entries once written are never rewritten (a preempted sequence
    gets a new list), which `GraphInputs`' incremental table upload relies on as well. So a run ended by a mismatch
    stays ended, and one that reached the limit compared before needs only the entries past it. Pairs not met in
    a step are forgotten (the memo holds the lists it keys, so their ids stay unique)."""

    def __init__(self) -> None:
        self._prev: dict[tuple[int, int], tuple[list[int], list[int], int, int]] = {}
        self._cur: dict[tuple[int, int], tuple[list[int], list[int], int, int]] = {}

    def step(self) -> None:
        """A new step's comparisons begin (what the last one did not ask for is dropped)."""
        self._prev, self._cur = self._cur or self._prev, {}

    def common(self, a: list[int], b: list[int], limit: int) -> int:
        key = (id(a), id(b))
        hit = self._cur.get(key) or self._prev.get(key)
        if hit is not None and hit[0] is a and hit[1] is b:
            run, checked = hit[2], hit[3]
            if run < checked or limit <= checked:  # known: a mismatch at `run`, or equal through `checked`
                self._cur[key] = hit
                return min(run, limit)
            run = _common_blocks(a, b, limit, checked)
        else:
            run = _common_blocks(a, b, limit)
        self._cur[key] = (a, b, run, limit)
        return run


def _runs(
    order: list[int], pools: list[list[list[int]]], usable: list[int], opt: CascadeOptions, memo: PrefixMemo | None
):
    """Split rows sorted by their tables into groups: a row joins the current group while the group's shared run
    stays >= min_blocks and the reads saved, (members - 1) x run, do not shrink."""
    common = _common_blocks if memo is None else memo.common
    groups: list[tuple[list[int], int]] = []
    cur, run = [order[0]], usable[order[0]]
    for i in order[1:]:
        prev = cur[-1]
        lcp = min(usable[i], usable[prev])
        for tables in pools:
            lcp = common(tables[prev], tables[i], lcp)
        shared = min(run, lcp)
        if shared >= opt.min_blocks and len(cur) * shared >= (len(cur) - 1) * run:
            cur.append(i)
            run = shared
        else:
            groups.append((cur, run))
            cur, run = [i], usable[i]
    groups.append((cur, run))
    return [(g, r) for g, r in groups if len(g) >= opt.min_seqs and r >= opt.min_blocks]


def find_groups(rows: BatchRows, opt: CascadeOptions, memo: PrefixMemo | None = None) -> list[tuple[list[int], int]]:
    """(member rows, shared blocks) of each group of a decode step. Only whole blocks before a row's last one count
    (the block the step writes is never shared), and block ids must agree in every pool the step reads. `memo`:
    the comparisons of earlier steps over the same block lists (one per engine, `PrefixMemo`)."""
    if memo is not None:
        memo.step()
    bs = opt.block_size
    pools = [rows.tables[p] for p in ("kv", "lr") if p in rows.tables]
    usable = [(c - 1) // bs for c in rows.context_lens]
    buckets: dict[tuple[int, ...], list[int]] = {}
    for i, n in enumerate(usable):
        if n >= opt.min_blocks:
            buckets.setdefault(tuple(t[i][0] for t in pools), []).append(i)
    groups = []
    for bucket in buckets.values():
        if len(bucket) >= opt.min_seqs:
            bucket.sort(key=lambda i: pools[0][i])  # lexicographic: rows sharing long runs become neighbours
            groups += _runs(bucket, pools, usable, opt, memo)
    return groups


# the plan's int32 arrays, in this order, in one flat buffer (one upload a step): name -> length in (rows, groups)
_FIELDS = (
    ("members", 1, 0, 0),
    ("group_start", 0, 1, 1),
    ("group_row", 0, 1, 0),
    ("shared_lens", 0, 1, 0),
    ("group_slot", 0, 1, 0),
    ("suffix_start", 1, 0, 0),
    ("member_row", 1, 0, 0),
    ("identity", 1, 0, 1),
)


def _layout(rows: int, groups: int) -> dict[str, slice]:
    """Where each plan array lies in the flat buffer of a plan for `rows` rows and `groups` group slots (each
    starting 64-byte aligned, as separate allocations would: Triton specialises kernels on pointer alignment)."""
    out, at = {}, 0
    for name, per_row, per_group, extra in _FIELDS:
        n = per_row * rows + per_group * groups + extra
        out[name] = slice(at, at + n)
        at += -(-n // 16) * 16
    return out


def _write_plan(
    buf: np.ndarray, lay: dict[str, slice], groups: list[tuple[list[int], int]], rows: BatchRows, size: int,
    block_size: int,
) -> tuple[bool, int]:  # fmt: skip
    """Write the plan of `groups` over the step's rows (padded to `size` rows, each padding row in no group) into
    `buf`; returns (whether every group's members share one adapter slot, the longest own part)."""
    slots, ctx = rows.seq_lora_slots, rows.context_lens
    capacity = lay["group_row"].stop - lay["group_row"].start
    members: list[int] = []
    starts, first, lens, gslot = [0], [], [], []
    suffix, member_row = [0] * size, [-1] * size
    uniform = True
    for rows_of, blocks in groups:
        for i in rows_of:
            suffix[i] = blocks * block_size
            member_row[i] = len(members)
            members.append(i)
        starts.append(len(members))
        first.append(rows_of[0])
        lens.append(blocks * block_size)
        mine = {slots[i] for i in rows_of}
        uniform = uniform and len(mine) == 1
        gslot.append(slots[rows_of[0]] if len(mine) == 1 else max(mine))
    pad = capacity - len(groups)
    buf[lay["members"]][: len(members)] = members
    buf[lay["group_start"]] = starts + [len(members)] * pad  # empty group slots: no members
    buf[lay["group_row"]] = first + [0] * pad
    buf[lay["shared_lens"]] = lens + [0] * pad
    buf[lay["group_slot"]] = gslot + [0] * pad
    buf[lay["suffix_start"]][:size] = suffix
    buf[lay["member_row"]][:size] = member_row
    buf[lay["identity"]][: size + 1] = np.arange(size + 1, dtype=np.int32)
    return uniform, max((c - s for c, s in zip(ctx, suffix)), default=0)


def _plan(
    buf: torch.Tensor, lay: dict[str, slice], size: int, groups: list[tuple[list[int], int]], **bounds
) -> CascadePlan:
    """A plan whose device arrays are views of the flat buffer (row arrays cut to `size` rows)."""
    v = {name: buf[sl] for name, sl in lay.items()}
    return CascadePlan(
        groups=groups,
        members=v["members"][:size],
        group_start=v["group_start"],
        group_row=v["group_row"],
        shared_lens=v["shared_lens"],
        group_slot=v["group_slot"],
        suffix_start=v["suffix_start"][:size],
        member_row=v["member_row"][:size],
        identity=v["identity"][: size + 1],
        **bounds,
    )


def plan_cascade(
    groups: list[tuple[list[int], int]], rows: BatchRows, block_size: int, device: torch.device
) -> CascadePlan | None:
    """The device form of `find_groups`' groups for an eager step (capacity: exactly its groups; None without
    any)."""
    if not groups:
        return None
    b = rows.num_seqs
    lay = _layout(b, len(groups))
    host = np.zeros(lay["identity"].stop, dtype=np.int32)
    uniform, max_own = _write_plan(host, lay, groups, rows, b, block_size)
    buf = torch.from_numpy(host)
    if device.type == "cuda":
        buf = buf.pin_memory()
    buf = buf.to(device, non_blocking=True)
    return _plan(
        buf,
        lay,
        b,
        [(list(g), n * block_size) for g, n in groups],
        uniform_slots=uniform,
        max_members=max(len(g) for g, _ in groups),
        max_shared=max(n for _, n in groups) * block_size,
        max_own=max_own,
        capacity=len(groups),
        split_groups=len(groups),
    )


class StaticCascadePlan:
    """A cascade plan of fixed shape in static device buffers, for CUDA-graph decode: at most `max_groups` groups
    over at most `max_batch` rows. `plan(size)` gives a captured graph of `size` rows its plan (views of the
    buffers, launch shape fixed by the bucket and the capacity); `fill` writes a step's groups in place before a
    replay (pinned host mirror, one asynchronous upload of ~4 max_batch + 4 max_groups int32)."""

    def __init__(self, max_batch: int, max_groups: int, max_model_len: int, block_size: int, device: torch.device):
        self.max_batch, self.max_groups = max_batch, max_groups
        self.max_model_len, self.block_size = max_model_len, block_size
        self.lay = _layout(max_batch, max_groups)
        n = self.lay["identity"].stop
        self.buf = torch.zeros(n, dtype=torch.int32, device=device)
        host = torch.zeros(n, dtype=torch.int32)
        self.host = host.pin_memory() if device.type == "cuda" else host
        self._np = self.host.numpy()
        self._plans: dict[int, CascadePlan] = {}

    def plan(self, size: int) -> CascadePlan:
        """The plan a graph of `size` rows captures: every bound at its largest (members: every row; shared and
        own parts: the longest context), so its grids and split counts are those of the bucket."""
        plan = _plan(
            self.buf,
            self.lay,
            size,
            [],
            uniform_slots=True,
            max_members=size,
            max_shared=self.max_model_len,
            max_own=self.max_model_len,
            capacity=self.max_groups,
            split_groups=1,
        )
        self._plans[size] = plan
        return plan

    def fits(self, groups: list[tuple[list[int], int]], rows: BatchRows, size: int) -> bool:
        """Whether a graph of `size` rows captured over `plan(size)` computes these groups: at most `max_groups`
        of them, and adapter slots mixed in a group only if no layer relied on them agreeing at capture."""
        if len(groups) > self.max_groups:
            return False
        plan = self._plans.get(size)
        if plan is None or not plan.slot_bound:
            return True
        slots = rows.seq_lora_slots
        return all(len({slots[i] for i in g}) == 1 for g, _ in groups)

    def clear(self, size: int) -> None:
        """No groups (a capture's warm-up run, which really executes)."""
        self._np[:] = 0
        self._np[self.lay["member_row"]] = -1
        self._np[self.lay["identity"]][: size + 1] = np.arange(size + 1, dtype=np.int32)
        self.buf.copy_(self.host)

    def fill(self, groups: list[tuple[list[int], int]], rows: BatchRows, size: int) -> None:
        """Write the step's groups (`fits` said yes) and upload them asynchronously (the previous step's upload is
        done: its sampling synchronised with the host)."""
        _write_plan(self._np, self.lay, groups, rows, size, self.block_size)
        self.buf.copy_(self.host, non_blocking=True)


def _pr_columns(p: _Pools) -> int:
    """LR columns acc_r accumulates: every slot's slice of a stacked row, else the r value columns."""
    return p.lr_width if p.lr_slice else p.r


def cascade_supported(plan: CascadePlan, p: _Pools) -> bool:
    """False where the shared keys would differ per reader (key LR over a group of several adapter slots) or a
    stacked row's acc_r is wider than `MAX_PR_COLUMNS`: such layers run plain decode."""
    if not (not p.has_lr or _pr_columns(p) <= MAX_PR_COLUMNS):
        return False
    if p.has_klr:
        plan.slot_bound = True  # this layer's choice follows `uniform_slots` (a static plan must keep it)
        return plan.uniform_slots
    return True


# ------------------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["stride_bt", "stride_lbt", "NUM_SPLITS"])
def _segment_partials_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    lr_ptr,
    bt_ptr,
    lbt_ptr,
    seg_row_ptr,
    seg_lo_ptr,
    seg_hi_ptr,
    seg_start_ptr,
    members_ptr,
    seg_slot_ptr,
    scaling_ptr,
    kup_ptr,
    cos_ptr,
    sin_ptr,
    pacc_ptr,
    pr_ptr,
    pml_ptr,
    sm_scale_log2,
    stride_qt,
    stride_qh,
    stride_bt,
    stride_lbt,
    stride_ks,
    stride_kr,
    NUM_SPLITS,
    HKV: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    PR_W: tl.constexpr,
    PR_PAD: tl.constexpr,
    LR_W: tl.constexpr,
    KLR_COL: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_LO: tl.constexpr,
    HAS_LR: tl.constexpr,
    HAS_KLR: tl.constexpr,
    ANY_LR: tl.constexpr,
    DOT_PREC: tl.constexpr,
    TRIG_ON_CHIP: tl.constexpr,
):
    """Program (row tile x kv head, split, segment): the query rows of a segment's members (member-major, the G
    q heads of kv head g each) against the segment's keys [lo, hi) of one split, read through the block tables of
    row `seg_row`; writes (acc_v, acc_r over PR_W LR columns, max, sum) at partial row (member index, split, head)."""
    mt = tl.program_id(0) // HKV
    g = tl.program_id(0) % HKV
    sp = tl.program_id(1)
    s = tl.program_id(2)
    first = tl.load(seg_start_ptr + s)
    n_rows = (tl.load(seg_start_ptr + s + 1) - first) * G
    if mt * BLOCK_M >= n_rows:
        return
    lo = 0
    if HAS_LO:
        lo = tl.load(seg_lo_ptr + s)
    hi = tl.load(seg_hi_ptr + s)
    split_len = tl.cdiv(tl.cdiv(hi - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = lo + sp * split_len
    end = tl.minimum(start + split_len, hi)

    offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    offs_r = tl.arange(0, R_PAD)
    offs_c = tl.arange(0, PR_PAD)
    rmask = offs_m < n_rows
    member = (first + offs_m // G).to(tl.int64)
    heads = g * G + offs_m % G
    seq = tl.load(members_ptr + member, mask=rmask, other=0).to(tl.int64)
    q_off = seq[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptr + q_off, mask=rmask[:, None], other=0.0)

    lr_end = 0
    slot = 0
    if ANY_LR:
        slot = tl.load(seg_slot_ptr + s)  # 0: no member reads LR rows (nothing is loaded from the LR pool)
        lr_end = tl.where(slot != 0, end, 0)
    kup = 0.0
    kup_rot = 0.0
    kscale = 0.0
    if HAS_KLR:  # every member's keys get the same s RoPE(R_k B_k): one slot per segment (`cascade_supported`)
        kup, kup_rot = _load_key_up(kup_ptr, slot, stride_ks, stride_kr, g * D, offs_r, offs_d, R, D)
        kscale = tl.load(scaling_ptr + slot)

    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    acc_r = tl.zeros([BLOCK_M, PR_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    row = tl.load(seg_row_ptr + s).to(tl.int64)
    bt_row = bt_ptr + row * stride_bt
    lbt_row = lbt_ptr + row * stride_lbt
    kv_col = g * D
    for n0 in range(start, end, BLOCK_N):
        kpos = n0 + offs_n
        kmask = kpos < end
        blk = tl.load(bt_row + kpos // BS, mask=kmask, other=0).to(tl.int64)
        kv_off = (blk * BS + kpos % BS)[:, None] * (HKV * D) + kv_col + offs_d[None, :]
        k = tl.load(k_ptr + kv_off, mask=kmask[:, None], other=0.0)
        v = tl.load(v_ptr + kv_off, mask=kmask[:, None], other=0.0)
        if ANY_LR:
            lmask = kpos < lr_end
            lrow = tl.load(lbt_row + kpos // BS, mask=lmask, other=0).to(tl.int64) * BS + kpos % BS
        if HAS_KLR:
            k = _add_key_lora(
                k, lr_ptr, lrow, lmask, kpos, kup, kup_rot, kscale, cos_ptr, sin_ptr, offs_r, offs_d, R, D, LR_W,
                KLR_COL, DOT_PREC, TRIG_ON_CHIP,
            )  # fmt: skip
        sc = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * sm_scale_log2
        sc = tl.where(kmask[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(sc - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        if HAS_LR:
            lr = tl.load(
                lr_ptr + lrow[:, None] * LR_W + offs_c[None, :],
                mask=lmask[:, None] & (offs_c[None, :] < PR_W),
                other=0.0,
            )
            acc_r = acc_r * alpha[:, None] + tl.dot(p.to(lr.dtype), lr, input_precision=DOT_PREC)
        m_i = m_new

    base = (member * NUM_SPLITS + sp) * (HKV * G) + heads
    tl.store(pacc_ptr + base[:, None] * D + offs_d[None, :], acc, mask=rmask[:, None])
    if HAS_LR:
        tl.store(pr_ptr + base[:, None] * PR_PAD + offs_c[None, :], acc_r, mask=rmask[:, None])
    tl.store(pml_ptr + base * 2, m_i, mask=rmask)
    tl.store(pml_ptr + base * 2 + 1, l_i, mask=rmask)


@triton.jit
def _partials_max(pml_ptr, row, n_splits, h, HQ: tl.constexpr, CHUNK: tl.constexpr):
    """Largest running max over a row's splits (-inf if it has none)."""
    offs_c = tl.arange(0, CHUNK)
    m = tl.full([CHUNK], float("-inf"), dtype=tl.float32)
    for c0 in range(0, n_splits, CHUNK):
        cs = c0 + offs_c
        crow = (row * n_splits + cs) * HQ + h
        m = tl.maximum(m, tl.load(pml_ptr + crow * 2, mask=cs < n_splits, other=float("-inf")))
    return tl.max(m, 0)


@triton.jit
def _partials_sum(
    acc,
    acc_r,
    big_l,
    pacc_ptr,
    pr_ptr,
    pml_ptr,
    row,
    n_splits,
    h,
    m_max,
    lr_col,
    offs_d,
    offs_r,
    HQ: tl.constexpr,
    D: tl.constexpr,
    R: tl.constexpr,
    PR_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
    HAS_LR: tl.constexpr,
):
    """Add a row's splits, rescaled to m_max: sum, acc_v and the reader's slice (lr_col..) of acc_r."""
    offs_c = tl.arange(0, CHUNK)
    for c0 in range(0, n_splits, CHUNK):
        cs = c0 + offs_c
        cmask = cs < n_splits
        crow = (row * n_splits + cs) * HQ + h
        w = tl.exp2(tl.load(pml_ptr + crow * 2, mask=cmask, other=float("-inf")) - m_max)
        big_l += tl.sum(w * tl.load(pml_ptr + crow * 2 + 1, mask=cmask, other=0.0), 0)
        part = tl.load(pacc_ptr + crow[:, None] * D + offs_d[None, :], mask=cmask[:, None], other=0.0)
        acc += tl.sum(w[:, None] * part, 0)
        if HAS_LR:
            cols = lr_col + offs_r
            part_r = tl.load(
                pr_ptr + crow[:, None] * PR_PAD + cols[None, :], mask=cmask[:, None] & (offs_r < R)[None, :], other=0.0
            )
            acc_r += tl.sum(w[:, None] * part_r, 0)
    return acc, acc_r, big_l


@triton.jit(do_not_specialize=["S_SHARED", "S_OWN"])
def _cascade_merge_kernel(
    sh_acc_ptr,
    sh_r_ptr,
    sh_ml_ptr,
    own_acc_ptr,
    own_r_ptr,
    own_ml_ptr,
    member_row_ptr,
    slot_ptr,
    vup_ptr,
    scaling_ptr,
    out_ptr,
    stride_ot,
    stride_oh,
    stride_vs,
    stride_vr,
    S_SHARED,
    S_OWN,
    HQ: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    PR_PAD: tl.constexpr,
    LR_SLICE: tl.constexpr,
    CHUNK: tl.constexpr,
    HAS_LR: tl.constexpr,
):
    """Program (row, q head): log-sum-exp merge of the row's shared-part splits (if in a group) and own splits,
    then (acc_v + s acc_r B_g) / sum with the row's own adapter."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_d = tl.arange(0, D)
    offs_r = tl.arange(0, R_PAD)
    mrow = tl.load(member_row_ptr + b)
    n_sh = tl.where(mrow >= 0, S_SHARED, 0)
    mrow = tl.maximum(mrow, 0).to(tl.int64)
    slot = tl.load(slot_ptr + b)
    lr_col = tl.maximum(slot - 1, 0) * LR_SLICE  # the row's slice of a stacked row's acc_r (else 0)
    m_max = tl.maximum(
        _partials_max(sh_ml_ptr, mrow, n_sh, h, HQ, CHUNK), _partials_max(own_ml_ptr, b, S_OWN, h, HQ, CHUNK)
    )
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    acc = tl.zeros([D], dtype=tl.float32)
    acc_r = tl.zeros([R_PAD], dtype=tl.float32)
    big_l = tl.sum(acc, 0)  # 0.0 as a float32 scalar (a loop-carried value of the merges below)
    acc, acc_r, big_l = _partials_sum(
        acc, acc_r, big_l, sh_acc_ptr, sh_r_ptr, sh_ml_ptr, mrow, n_sh, h, m_max, lr_col, offs_d, offs_r, HQ, D, R,
        PR_PAD, CHUNK, HAS_LR,
    )  # fmt: skip
    acc, acc_r, big_l = _partials_sum(
        acc, acc_r, big_l, own_acc_ptr, own_r_ptr, own_ml_ptr, b, S_OWN, h, m_max, lr_col, offs_d, offs_r, HQ, D, R,
        PR_PAD, CHUNK, HAS_LR,
    )  # fmt: skip
    out = acc
    if HAS_LR:
        if slot != 0:
            scale = tl.load(scaling_ptr + slot)
            up = _value_up_cols(vup_ptr, slot, stride_vs, stride_vr, h // G, offs_r, offs_d, D, R)
            out = out + scale * tl.sum(acc_r[:, None] * up, 0)
    big_l = tl.where(big_l == 0.0, 1.0, big_l)
    tl.store(out_ptr + b * stride_ot + h * stride_oh + offs_d, (out / big_l).to(out_ptr.dtype.element_ty))


# ------------------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------------------
def cascade_num_splits(programs: int, keys: int, device: torch.device, block_n: int, per_sm: int = 4) -> int:
    """Splits for about one wave of `programs` x splits programs, >= 2 key tiles a split, at most 256."""
    wave = per_sm * _num_sms(device)
    return max(1, min(wave // max(1, programs), -(-keys // (2 * block_n)), 256))


def _partials(rows: int, splits: int, hq: int, d: int, pr_pad: int, device: torch.device):
    """acc [rows, splits, hq, d], acc_r [.., pr_pad] (acc when there is no LR term), (max, sum) [.., 2]: float32."""
    per_row = splits * hq * (d + pr_pad + 2)
    buf = torch.empty(max(1, rows * per_row), dtype=torch.float32, device=device)
    n_acc, n_r = rows * splits * hq * d, rows * splits * hq * pr_pad
    pacc = buf[:n_acc].view(rows, splits, hq, d)
    pr = buf[n_acc : n_acc + n_r].view(rows, splits, hq, pr_pad) if pr_pad else pacc
    pml = buf[n_acc + n_r : n_acc + n_r + rows * splits * hq * 2].view(rows, splits, hq, 2)
    return pacc, pr, pml


def cascade_decode(
    query: torch.Tensor,
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    lr_pool: torch.Tensor | None,
    base_block_tables: torch.Tensor,
    lr_block_tables: torch.Tensor | None,
    context_lens: torch.Tensor,
    seq_lora_slots: torch.Tensor,
    value_up: torch.Tensor | None,
    lora_scaling: torch.Tensor,
    plan: CascadePlan,
    out: torch.Tensor | None = None,
    sm_scale: float | None = None,
    key_lr: KeyLR | None = None,
    shared_splits: int | None = None,
    own_splits: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor | None:
    """`paged_decode`'s result (query [B, Hq, d] -> [B, Hq, d]) with each group's shared keys read once; None
    (nothing launched) where `cascade_supported` says this layer cannot, so the caller runs plain decode.

    Splits default to about one wave per launch (the shared keys over the groups' row tiles, the own keys over
    the rows)."""
    b, hq, d = query.shape
    p = _Pools(key_pool, value_pool, lr_pool, value_up, lora_scaling, key_pool.shape[1], key_lr)
    if hq % p.hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {p.hkv} kv heads")
    if not cascade_supported(plan, p):
        return None
    if query.stride(-1) != 1:
        query = query.contiguous()
    out = torch.empty_like(query) if out is None else out
    if b == 0:
        return out
    g = hq // p.hkv
    on_gpu = query.device.type == "cuda"
    if block_n is None:
        block_n = (64 if query.element_size() * d <= 256 else 32) if on_gpu else 16
    if block_m is None:
        block_m = min(64 if on_gpu else 16, triton.next_power_of_2(max(16, plan.max_members * g)))
    num_warps = 4 if num_warps is None else num_warps
    pr_w = _pr_columns(p)
    pr_pad = max(16, triton.next_power_of_2(pr_w), 8 * num_warps) if p.has_lr else 0
    sm_scale = d**-0.5 if sm_scale is None else sm_scale
    lbt = lr_block_tables if (p.any_lr and lr_block_tables is not None) else base_block_tables
    groups = plan.capacity or len(plan.groups)  # grid group slots (empty ones exit at once)
    tiles = triton.cdiv(plan.max_members * g, block_m)
    if shared_splits is None:
        programs = (plan.split_groups or len(plan.groups)) * tiles * p.hkv
        shared_splits = cascade_num_splits(programs, plan.max_shared, query.device, block_n)
    if own_splits is None:
        own_splits = cascade_num_splits(b * p.hkv, plan.max_own, query.device, block_n)
    common: dict[str, Any] = dict(
        q=query, p=p, bt=base_block_tables, lbt=lbt, sm_scale_log2=sm_scale * LOG2E, pr_w=pr_w, pr_pad=pr_pad,
        block_n=block_n, num_warps=num_warps,
    )  # fmt: skip
    shared = _launch_segments(
        **common, seg_row=plan.group_row, seg_lo=None, seg_hi=plan.shared_lens, seg_start=plan.group_start,
        members=plan.members, seg_slot=plan.group_slot, segments=groups, rows=plan.members.shape[0],
        max_rows=plan.max_members * g, splits=shared_splits, block_m=block_m,
    )  # fmt: skip
    own = _launch_segments(
        **common, seg_row=plan.identity, seg_lo=plan.suffix_start, seg_hi=context_lens, seg_start=plan.identity,
        members=plan.identity, seg_slot=seq_lora_slots, segments=b, rows=b, max_rows=g, splits=own_splits,
        block_m=max(16, triton.next_power_of_2(g)),
    )  # fmt: skip
    _cascade_merge_kernel[(b, hq)](
        *shared, *own, plan.member_row, seq_lora_slots, p.vup, lora_scaling, out, out.stride(0), out.stride(1),
        p.stride_vs, p.stride_vr, shared_splits, own_splits, HQ=hq, G=g, D=d, R=p.r, R_PAD=p.r_pad,
        PR_PAD=max(pr_pad, 16), LR_SLICE=p.lr_slice, CHUNK=_chunk(max(shared_splits, own_splits), d), HAS_LR=p.has_lr,
        num_warps=4,
    )  # fmt: skip
    return out


def _chunk(splits: int, d: int) -> int:
    """Splits the merge reads at once (as plain decode's merge: [CHUNK, d] float32 tiles)."""
    return min(max(16, triton.next_power_of_2(splits)), 64 if d <= 128 else 32)


def _launch_segments(
    q, p: _Pools, bt, lbt, sm_scale_log2, pr_w, pr_pad, block_n, num_warps, seg_row, seg_lo, seg_hi, seg_start,
    members, seg_slot, segments: int, rows: int, max_rows: int, splits: int, block_m: int,
):  # fmt: skip
    """One `_segment_partials_kernel` launch; returns its (acc_v, acc_r, max-sum) partials."""
    hq, d = q.shape[1], q.shape[2]
    pacc, pr, pml = _partials(rows, splits, hq, d, pr_pad, q.device)
    tiles = triton.cdiv(max_rows, block_m)
    _segment_partials_kernel[(tiles * p.hkv, splits, segments)](
        q, p.key, p.value, p.lr, bt, lbt, seg_row, seg_hi if seg_lo is None else seg_lo, seg_hi, seg_start, members,
        seg_slot, p.scaling, p.kup, p.cos, p.sin, pacc, pr, pml, sm_scale_log2, q.stride(0), q.stride(1),
        bt.stride(0), lbt.stride(0), p.stride_ks, p.stride_kr, splits, HKV=p.hkv, G=hq // p.hkv, D=d, R=p.r,
        R_PAD=p.r_pad, PR_W=max(pr_w, 1), PR_PAD=max(pr_pad, 16), LR_W=p.lr_width, KLR_COL=p.klr_col, BS=p.bs,
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_LO=seg_lo is not None, HAS_LR=p.has_lr, HAS_KLR=p.has_klr,
        ANY_LR=p.any_lr, DOT_PREC=_dot_precision(q.dtype), TRIG_ON_CHIP=p.trig_on_chip, num_warps=num_warps,
        num_stages=2,
    )  # fmt: skip
    return pacc, pr, pml
