"""`lragent analyze`: how much each KV sharing scheme changes what an agent computes (the paper's Table 1 and more).

    lragent analyze                                   # shipped HotpotQA adapter sets, 8 AutoAct trajectories
    lragent analyze --limit 16 --max-tokens 1024 --window 64 --threads 1 --out results/analyze
    lragent analyze --trajectories results/eval/eval.json   # trajectories an `eval --save-trajectories` run wrote

Two measurements over real trajectories: the AutoAct HotpotQA trajectories (`hotpotqa_full_trajectories.json`,
the correct ones, rendered in the pipeline's prompt format) or the pipeline's own trajectories from an eval JSON.
Each trajectory is cut to its first `--max-tokens` tokens.

1. Cache similarity across agents (the paper's Table 1). Every agent runs its OWN forward pass over the same tokens
   (non_shared). Per layer and token, the cosine similarity between two agents of
   - the full value `V = X W_v0 + s (X A_v) B_v`,  - the base value `X W_v0`,  - the adapter output `s (X A_v) B_v`,
   - the keys `X W_k` (RoPE rotates both agents' keys alike, so pre- and post-RoPE cosines are equal),
   - and the LR cache entries `R = X A_v` (what base_lr_shared shares; meaningless unless A is shared),
   each vector flattened over the kv heads. Averaged over tokens (token-weighted), agent pairs and trajectories.
2. Handoff fidelity. A trajectory of L tokens is cut at P, the block boundary leaving at least `--window` tokens:
   the producer agent prefills tokens [0, P) under the scheme, then the reader agent reads all L tokens through
   the engine, reusing whatever the scheme lets it reuse (a plan -> action handoff, teacher-forced). Its next-token
   distributions at positions [P, L) are compared with its own non_shared forward pass: greedy (argmax) agreement,
   KL(non_shared || scheme) in nats, the change in NLL of the trajectory's actual next tokens, and the relative
   error of its hidden states after every layer. For scale, the "role gap" compares the reader's own distribution
   with the producer's own distribution at the same positions (what the adapters change in the first place).

Everything runs through the engine (`LLM`) with forward hooks on the model (`k_proj`/`v_proj` outputs, `X A_v` from
the engine's LoRA bank, every decoder layer's output, the final hidden states); nothing is reimplemented. Writes
analyze.json, analyze.md (the tables) and analyze.png (per-layer plot) to `--out`.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lragent.cache.sharing import SharingMode
from lragent.eval.runner import DEFAULT_ADAPTER_ROOT, AdapterSet, find_adapter_sets
from lragent.train.data import ROLES

SCHEMES = tuple(m.value for m in SharingMode if m is not SharingMode.NON_SHARED)  # each compared with non_shared
# the handoffs of the AutoAct loop: plan's thought/tool -> action's argument; action + observation -> plan's next
# thought; plan's Finish -> reflect
HANDOFF_PAIRS = (("plan", "action"), ("action", "plan"), ("plan", "reflect"))
QUANTITIES = ("full_value", "base_value", "adapter_output", "key", "lr")
QUANTITY_TITLES = {
    "full_value": "full value V",
    "base_value": "base value X W_v0",
    "adapter_output": "adapter output s R B",
    "key": "keys",
    "lr": "LR cache R = X A",
}


@dataclass
class AnalyzeSpec:
    trajectories: str
    adapter_sets: list[AdapterSet]
    model: str = "smollm2-135m-instruct"
    limit: int = 8
    max_tokens: int = 1024
    window: int = 64
    pairs: list[tuple[str, str]] = field(default_factory=lambda: list(HANDOFF_PAIRS))
    schemes: list[str] = field(default_factory=lambda: list(SCHEMES))
    force: bool = True  # base_lr_shared on a set without shared A: run it forced (allow_unshared_a) and label it
    control: bool = False  # also run non_shared through the handoff protocol (must give KL 0, agreement 100%)
    similarity: bool = True
    kv_cache_bytes: int = 256 << 20
    block_size: int = 16
    quantization: str | None = None  # the compared engines' weights ("fp8"); the reference keeps the model's own


# ---- trajectories ---------------------------------------------------------------------------------------------


def default_trajectories() -> Path:
    from lragent.train.examples import FULL_TRAJECTORIES, default_data_dir  # noqa: PLC0415

    return default_data_dir() / FULL_TRAJECTORIES["hotpotqa"]


def load_trajectory_texts(path: str | Path) -> list[str]:
    """Trajectory texts in the pipeline's prompt format, from a full-trajectories file (a JSON list of
    {question, correct, prompt}: the correct ones, rendered with `lragent.train.data`) or an eval JSON written with
    `--save-trajectories` ({"questions": [{"trajectory": ...}, ...]})."""
    from lragent.train import data as D  # noqa: PLC0415
    from lragent.train.examples import read_full_trajectories  # noqa: PLC0415

    path = Path(path)
    payload = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(payload, dict) and "questions" in payload:
        texts = [q["trajectory"] for q in payload["questions"] if q.get("trajectory")]
        if not texts:
            raise ValueError(f"{path}: no trajectories (run `lragent eval` with --save-trajectories)")
        return list(dict.fromkeys(texts))  # the same question under several schemes: keep one copy of each text
    if isinstance(payload, list) and payload and "prompt" in payload[0]:
        return [D.render_history(t.task, t.question, t.steps) for t in read_full_trajectories(path)]
    raise ValueError(f"{path}: neither a full-trajectories list nor an eval JSON with saved trajectories")


def token_trajectories(
    texts: Sequence[str], tokenizer: Any, limit: int, max_tokens: int, min_tokens: int
) -> list[list[int]]:
    """The first `limit` texts with at least `min_tokens` tokens, each cut to `max_tokens` tokens."""
    out = []
    for text in texts:
        ids = list(tokenizer.encode(text, add_special_tokens=True))
        if len(ids) >= min_tokens:
            out.append(ids[:max_tokens])
        if len(out) >= limit:
            break
    return out


def split_point(length: int, window: int, block_size: int) -> int:
    """P: the last block boundary leaving at least `window` tokens after it (only full blocks are reused)."""
    return max(0, (length - window) // block_size * block_size)


# ---- hooks ----------------------------------------------------------------------------------------------------


class Recorder:
    """Forward hooks on the engine's model that keep, per sequence (adapter slot) of each step:
    keys, base values and `X A_v` of every layer (when `capture_kv`), and the output of every decoder layer plus the
    final hidden states at positions >= `window_start` (when set)."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.model = engine.model
        self.bank = engine.bank
        self.capture_kv = False
        self.window_start: int | None = None
        self.ctx = None
        self.kv: dict[int, dict[str, dict[int, list[torch.Tensor]]]] = {}
        self.hidden: dict[int, dict[int, list[tuple[torch.Tensor, torch.Tensor]]]] = {}  # slot -> layer -> (pos, h)
        self.handles = [self.model.register_forward_pre_hook(self._pre)]
        layers = self.model.model.layers
        for i, layer in enumerate(layers):
            self.handles.append(layer.self_attn.k_proj.register_forward_hook(self._kv_hook(i, "key")))
            self.handles.append(layer.self_attn.v_proj.register_forward_hook(self._kv_hook(i, "value")))
            self.handles.append(layer.register_forward_hook(self._hidden_hook(i)))
        self.num_layers = len(layers)
        self.handles.append(self.model.register_forward_hook(self._hidden_hook(self.num_layers)))  # final (normed)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def clear(self) -> None:
        self.kv, self.hidden = {}, {}

    def _pre(self, module, args) -> None:
        self.ctx = args[1]

    def _rows(self) -> list[tuple[int, slice]]:
        starts = self.ctx.attn.query_start.tolist()
        slots = self.ctx.attn.seq_lora_slots.tolist()
        return [(slot, slice(starts[i], starts[i + 1])) for i, slot in enumerate(slots)]

    def _kv_hook(self, layer: int, kind: str) -> Callable:
        def hook(module, args, output) -> None:
            if not self.capture_kv:
                return
            if self.ctx.attn.base_write_idx is not None:
                raise RuntimeError("capture_kv needs every token computed in full (reset the prefix cache first)")
            for slot, rows in self._rows():
                store = self.kv.setdefault(slot, {})
                store.setdefault(kind, {}).setdefault(layer, []).append(output[rows].detach().float().clone())
                if kind == "value":
                    down = self.bank.down.get((layer, "v_proj"))
                    x = args[0][rows].detach()
                    r = x @ down[slot] if down is not None else x.new_zeros(x.shape[0], self.bank.max_rank)
                    store.setdefault("lr", {}).setdefault(layer, []).append(r.float())

        return hook

    def _hidden_hook(self, layer: int) -> Callable:
        def hook(module, args, output) -> None:
            if self.window_start is None:
                return
            if isinstance(output, tuple):  # a decoder layer: (residual stream, its MLP output the next norm adds)
                output = output[0] + output[1]
            positions = self.ctx.positions
            for slot, rows in self._rows():
                pos = positions[rows]
                keep = pos >= self.window_start
                if bool(keep.any()):
                    entry = (pos[keep].detach().clone(), output[rows][keep].detach().float().clone())
                    self.hidden.setdefault(slot, {}).setdefault(layer, []).append(entry)

        return hook

    def kv_tensors(self, slot: int) -> dict[str, list[torch.Tensor]]:
        """kind -> per-layer [L, width] tensors of one sequence's keys, base values and LR entries."""
        store = self.kv[slot]
        return {kind: [torch.cat(store[kind][i]) for i in range(self.num_layers)] for kind in ("key", "value", "lr")}

    def hidden_tensors(self, slot: int, start: int, end: int) -> torch.Tensor:
        """[num_layers + 1, end - start, hidden]: each layer's output (last: final normed) at positions [start, end)."""
        out = []
        for layer in range(self.num_layers + 1):
            entries = self.hidden[slot][layer]
            pos = torch.cat([p for p, _ in entries])
            h = torch.cat([x for _, x in entries])
            order = torch.argsort(pos)
            pos, h = pos[order], h[order]
            if pos.tolist() != list(range(start, end)):
                raise RuntimeError(f"hidden states cover positions {pos[:3].tolist()}... not [{start}, {end})")
            out.append(h)
        return torch.stack(out)


# ---- measurements ---------------------------------------------------------------------------------------------


def _greedy():
    from lragent import SamplingParams  # noqa: PLC0415

    return SamplingParams(max_tokens=1, temperature=0.0)


@dataclass
class SimilarityAccumulator:
    """Sums of per-token cosine similarities per (pair, quantity, layer)."""

    num_layers: int
    sums: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # pair -> quantity -> per layer
    tokens: dict[str, int] = field(default_factory=dict)

    def add(self, pair: str, quantity: str, layer: int, cos: torch.Tensor) -> None:
        per = self.sums.setdefault(pair, {}).setdefault(quantity, [0.0] * self.num_layers)
        per[layer] += float(cos.double().sum())

    def result(self) -> dict:
        pairs = sorted(self.sums)
        per_pair = {p: {q: [s / self.tokens[p] for s in self.sums[p][q]] for q in QUANTITIES} for p in pairs}
        per_layer = {
            q: [
                sum(self.sums[p][q][i] for p in pairs) / sum(self.tokens[p] for p in pairs)
                for i in range(self.num_layers)
            ]
            for q in QUANTITIES
        }
        mean = {q: sum(v) / len(v) for q, v in per_layer.items()}
        pair_mean = {p: {q: sum(v) / len(v) for q, v in per_pair[p].items()} for p in pairs}
        return {"mean": mean, "per_layer": per_layer, "per_pair": pair_mean, "tokens_per_pair": self.tokens}


def similarity_of(
    kv: dict[str, dict[str, list[torch.Tensor]]], bank: Any, slots: dict[str, int], acc: SimilarityAccumulator
) -> None:
    """Add one trajectory's cross-agent cosine similarities (each agent's own non_shared pass) to `acc`."""
    roles = list(kv)
    length = kv[roles[0]]["key"][0].shape[0]
    for a, b in combinations(roles, 2):
        pair = f"{a}-{b}"
        acc.tokens[pair] = acc.tokens.get(pair, 0) + length
        for layer in range(acc.num_layers):
            parts = {}
            for role in (a, b):
                slot = slots[role]
                up = bank.up.get((layer, "v_proj"))
                r = kv[role]["lr"][layer]
                delta = (
                    (r @ up[slot].float()) * bank.scaling_host[slot]
                    if up is not None
                    else torch.zeros_like(kv[role]["value"][layer])
                )
                base = kv[role]["value"][layer]
                parts[role] = {
                    "full_value": base + delta,
                    "base_value": base,
                    "adapter_output": delta,
                    "key": kv[role]["key"][layer],
                    "lr": r,
                }
            for q in QUANTITIES:
                acc.add(pair, q, layer, F.cosine_similarity(parts[a][q], parts[b][q], dim=-1, eps=1e-12))


@dataclass
class FidelityAccumulator:
    num_layers: int
    positions: int = 0
    agree: int = 0
    kl: list[float] = field(default_factory=list)
    nll_ref: float = 0.0
    nll: float = 0.0
    nll_tokens: int = 0
    rel_err: list[float] = field(default_factory=list)  # per layer, summed over positions
    reused: list[int] = field(default_factory=list)
    base_reused: list[int] = field(default_factory=list)

    def add(
        self,
        logits_ref: torch.Tensor,
        logits: torch.Tensor,
        targets: torch.Tensor,
        h_ref: torch.Tensor,
        h: torch.Tensor,
    ) -> None:
        lp_ref, lp = F.log_softmax(logits_ref.double(), -1), F.log_softmax(logits.double(), -1)
        kl = (lp_ref.exp() * (lp_ref - lp)).sum(-1).clamp_min(0.0)
        self.kl += kl.tolist()
        self.positions += logits.shape[0]
        self.agree += int((logits_ref.argmax(-1) == logits.argmax(-1)).sum())
        n = targets.shape[0]  # positions with a next token inside the trajectory
        self.nll_ref -= float(lp_ref[:n].gather(-1, targets[:, None]).sum())
        self.nll -= float(lp[:n].gather(-1, targets[:, None]).sum())
        self.nll_tokens += n
        err = (h - h_ref).norm(dim=-1) / h_ref.norm(dim=-1).clamp_min(1e-12)  # [layers, positions]
        sums = err.double().sum(-1).tolist()
        self.rel_err = [x + y for x, y in zip(self.rel_err, sums)] if self.rel_err else sums

    def merge(self, other: FidelityAccumulator) -> None:
        self.positions += other.positions
        self.agree += other.agree
        self.kl += other.kl
        self.nll_ref += other.nll_ref
        self.nll += other.nll
        self.nll_tokens += other.nll_tokens
        self.rel_err = [x + y for x, y in zip(self.rel_err, other.rel_err)] if self.rel_err else list(other.rel_err)
        self.reused += other.reused
        self.base_reused += other.base_reused

    def result(self) -> dict:
        n = max(self.positions, 1)
        kl = sorted(self.kl)
        return {
            "positions": self.positions,
            "agreement": self.agree / n,
            "kl_mean": sum(kl) / n,
            "kl_median": kl[len(kl) // 2] if kl else 0.0,
            "kl_p95": kl[min(len(kl) - 1, int(0.95 * len(kl)))] if kl else 0.0,
            "kl_max": kl[-1] if kl else 0.0,
            "nll_ref": self.nll_ref / max(self.nll_tokens, 1),
            "nll": self.nll / max(self.nll_tokens, 1),
            "nll_delta": (self.nll - self.nll_ref) / max(self.nll_tokens, 1),
            "hidden_rel_err_per_layer": [e / n for e in self.rel_err],
            "reused_tokens_mean": sum(self.reused) / max(len(self.reused), 1),
            "base_reused_tokens_mean": sum(self.base_reused) / max(len(self.base_reused), 1),
        }


def _make_llm(spec: AnalyzeSpec, aset: AdapterSet, scheme: str, force: bool = False, reference: bool = False) -> Any:
    """An engine for one scheme; `spec.quantization` applies to the compared engines only, so with --control the
    non_shared row measures what the quantised weights change against the reference's own."""
    from lragent import LLM  # noqa: PLC0415

    return LLM(
        quantization=None if reference else spec.quantization,
        model=spec.model,
        adapters=dict(aset.paths),
        sharing=scheme,
        device="cpu",
        kv_cache_bytes=spec.kv_cache_bytes,
        block_size=spec.block_size,
        allow_unshared_a=force,
    )


def _free(llm: Any, rec: Recorder | None) -> None:
    if rec is not None:
        rec.close()
    del llm
    gc.collect()


def shared_a(aset: AdapterSet, model: str) -> bool:
    """Whether every role's v_proj A is the same matrix (what base_lr_shared needs)."""
    from lragent.bench.adapters import model_config_for  # noqa: PLC0415
    from lragent.lora.adapter import load_peft_adapter, unshared_value_layers  # noqa: PLC0415

    config = model_config_for(model)
    adapters = [load_peft_adapter(r, p, config) for r, p in aset.paths.items()]
    return not unshared_value_layers(adapters, config.num_layers)


@dataclass
class _References:
    """What the non_shared reference passes hand to the handoff measurements: the token trajectories, each reader's
    own hidden states over each trajectory's window, and the model whose head turns them into logits."""

    trajs: list[list[int]]
    refs: list[dict[str, torch.Tensor]]  # per trajectory: reader -> [num_layers + 1, window, hidden]
    model: Any
    num_layers: int
    block_size: int


def _reference_pass(
    llm: Any,
    rec: Recorder,
    spec: AnalyzeSpec,
    ids: list[int],
    split: int,
    roles: list[str],
    readers: list[str],
    slots: dict[str, int],
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Every role's own full forward pass over one trajectory (nothing reused): its keys, base values and LR
    entries (for the similarity) and, for the readers, its hidden states over the window after `split`."""
    kv, ref = {}, {}
    for role in roles:
        if not spec.similarity and role not in readers:
            continue
        llm.engine.reset_prefix_cache()
        rec.clear()
        rec.capture_kv = spec.similarity
        rec.window_start = split if role in readers else None
        out = llm.generate([ids], adapter=role, sampling_params=_greedy())[0]
        assert out.metrics.computed_tokens == len(ids), "reference pass reused cached tokens"
        if spec.similarity:
            kv[role] = rec.kv_tensors(slots[role])
        if role in readers:
            ref[role] = rec.hidden_tensors(slots[role], split, len(ids))
    rec.capture_kv, rec.window_start = False, None
    rec.clear()
    return kv, ref


def _reference_analysis(
    spec: AnalyzeSpec, aset: AdapterSet, is_shared: bool, log: Callable[[str], None], t0: float
) -> tuple[dict, _References]:
    """The non_shared reference passes of every trajectory: the cross-agent similarity, the role gap, and the
    references the handoff measurements compare against."""
    roles = [r for r in ROLES if r in aset.paths]
    readers = sorted({b for _, b in spec.pairs}, key=ROLES.index)
    llm = _make_llm(spec, aset, "non_shared", reference=True)
    engine = llm.engine
    bs = llm.cache_stats()["block_size"]
    texts = load_trajectory_texts(spec.trajectories)
    trajs = token_trajectories(texts, llm.tokenizer, spec.limit, spec.max_tokens, spec.window + 2 * bs)
    if not trajs:
        raise ValueError(f"no trajectory of at least {spec.window + 2 * bs} tokens in {spec.trajectories}")
    slots = {r: engine.registry.slot_of(r) for r in roles}
    rec = Recorder(engine)
    sim = SimilarityAccumulator(rec.num_layers)
    refs: list[dict[str, torch.Tensor]] = []
    log(f"[{aset.name}] {len(trajs)} trajectories, {sum(map(len, trajs))} tokens, shared A: {is_shared}")
    for t, ids in enumerate(trajs):
        split = split_point(len(ids), spec.window, bs)
        kv, ref = _reference_pass(llm, rec, spec, ids, split, roles, readers, slots)
        if spec.similarity:
            similarity_of(kv, engine.bank, slots, sim)
        refs.append(ref)
        log(f"  [{aset.name}] reference passes {t + 1}/{len(trajs)} ({time.perf_counter() - t0:.0f}s)")
    result: dict[str, Any] = {
        "adapters": aset.name,
        "paths": dict(aset.paths),
        "shared_a": is_shared,
        "trajectories": len(trajs),
        "tokens": sum(map(len, trajs)),
        "num_layers": rec.num_layers,
    }
    if spec.similarity:
        result["similarity"] = sim.result()
    result["role_gap"] = role_gap(spec, trajs, refs, engine.model, bs)
    references = _References(trajs, refs, engine.model, rec.num_layers, bs)
    _free(llm, rec)
    return result, references


def _handoff(
    llm: Any,
    rec: Recorder,
    spec: AnalyzeSpec,
    ids: list[int],
    producer: str,
    ref: dict[str, torch.Tensor],
    references: _References,
    per_pair: dict[str, FidelityAccumulator],
) -> None:
    """One trajectory's handoff from `producer`: it prefills [0, P) under the scheme, then each of its readers
    reads the whole trajectory reusing what the scheme allows; their window is compared with their own
    references."""
    split = split_point(len(ids), spec.window, references.block_size)
    targets = torch.tensor(ids[split + 1 :])
    group = [b for a, b in spec.pairs if a == producer]
    llm.engine.reset_prefix_cache()
    rec.clear()
    llm.generate([ids[:split]], adapter=producer, sampling_params=_greedy())
    rec.window_start = split
    # all readers in ONE batch: each finds only the producer's blocks, never another reader's
    outs = llm.generate([ids] * len(group), adapter=group, sampling_params=[_greedy()] * len(group))
    rec.window_start = None
    for reader, out in zip(group, outs):
        h = rec.hidden_tensors(llm.engine.registry.slot_of(reader), split, len(ids))
        h_ref = ref[reader]
        with torch.inference_mode():
            logits_ref, logits = references.model.logits(h_ref[-1]), references.model.logits(h[-1])
        acc = per_pair[f"{producer}->{reader}"]
        acc.add(logits_ref, logits, targets, h_ref, h)
        acc.reused.append(out.metrics.reused_tokens)
        acc.base_reused.append(out.metrics.base_reused_tokens)


def _scheme_fidelity(spec: AnalyzeSpec, aset: AdapterSet, scheme: str, forced: bool, references: _References) -> dict:
    """Handoff fidelity of one scheme over every trajectory and pair, on an engine of its own."""
    llm = _make_llm(spec, aset, scheme, force=forced)
    rec = Recorder(llm.engine)
    per_pair = {f"{a}->{b}": FidelityAccumulator(references.num_layers) for a, b in spec.pairs}
    producers = list(dict.fromkeys(a for a, _ in spec.pairs))
    for t, ids in enumerate(references.trajs):
        for producer in producers:
            _handoff(llm, rec, spec, ids, producer, references.refs[t], references, per_pair)
    total = FidelityAccumulator(references.num_layers)
    for acc in per_pair.values():
        total.merge(acc)
    _free(llm, rec)
    return {
        "scheme": scheme,
        "forced": forced,
        "split_reused_expected": _expected_reuse(scheme),
        **total.result(),
        "per_pair": {p: a.result() for p, a in per_pair.items()},
    }


def analyze_set(spec: AnalyzeSpec, aset: AdapterSet, log: Callable[[str], None] = print) -> dict:
    """Similarity (non_shared passes) and handoff fidelity of every scheme for one adapter set."""
    is_shared = shared_a(aset, spec.model)
    t0 = time.perf_counter()
    result, references = _reference_analysis(spec, aset, is_shared, log, t0)
    fidelity = []
    for scheme in (["non_shared"] if spec.control else []) + list(spec.schemes):
        forced = scheme == SharingMode.BASE_LR_SHARED and not is_shared
        if forced and not spec.force:
            log(f"[{aset.name}] base_lr_shared skipped: the adapters do not share v_proj A (pass --force)")
            continue
        entry = _scheme_fidelity(spec, aset, scheme, forced, references)
        fidelity.append(entry)
        log(
            f"[{aset.name}] {scheme}{' (forced)' if forced else ''}: agreement {100 * entry['agreement']:.1f}% "
            f"KL {entry['kl_mean']:.4f} dNLL {entry['nll_delta']:+.4f} ({time.perf_counter() - t0:.0f}s)"
        )
    result["fidelity"] = fidelity
    result["wall_s"] = time.perf_counter() - t0
    return result


def role_gap(
    spec: AnalyzeSpec, trajs: list[list[int]], refs: list[dict[str, torch.Tensor]], model: Any, block_size: int
) -> dict:
    """The scale of what the adapters change: the reader's own distribution vs the producer's own distribution at
    the same window positions (both non_shared), per cross-agent pair whose producer is also a reader."""
    per_pair = {}
    for producer, reader in spec.pairs:
        if producer == reader or producer not in refs[0] or reader not in refs[0]:
            continue
        acc = FidelityAccumulator(0)
        for t, ids in enumerate(trajs):
            split = split_point(len(ids), spec.window, block_size)
            h_reader, h_producer = refs[t][reader], refs[t][producer]
            with torch.inference_mode():
                acc.add(
                    model.logits(h_reader[-1]),
                    model.logits(h_producer[-1]),
                    torch.tensor(ids[split + 1 :]),
                    h_reader,
                    h_producer,
                )
        per_pair[f"{producer}->{reader}"] = acc
    total = FidelityAccumulator(0)
    for acc in per_pair.values():
        total.merge(acc)
    keys = ("positions", "agreement", "kl_mean", "kl_median", "kl_p95", "kl_max")
    return {
        **{k: total.result()[k] for k in (*keys, "hidden_rel_err_per_layer")},
        "per_pair": {p: {k: a.result()[k] for k in keys} for p, a in per_pair.items()},
    }


EXPECTED_REUSE = {
    "non_shared": "none",
    "full_shared": "all of [0, P)",
    "base_shared": "keys/base values of [0, P)",
    "base_lr_shared": "all of [0, P)",
}


def _expected_reuse(scheme: str) -> str:
    """What the reader should reuse of the producer's prefix (a scheme added later reports what it did, unjudged)."""
    return EXPECTED_REUSE.get(scheme, "not stated")


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def run_analysis(spec: AnalyzeSpec, log: Callable[[str], None] = print) -> dict:
    if not spec.adapter_sets:
        raise ValueError("no adapter sets")
    sets = [analyze_set(spec, aset, log) for aset in spec.adapter_sets]
    spec_dict = asdict(spec)
    spec_dict["adapter_sets"] = [a.name for a in spec.adapter_sets]
    return {"spec": spec_dict, "machine": machine_info(), "sets": sets}


# ---- output ---------------------------------------------------------------------------------------------------


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def similarity_table(report: dict) -> tuple[list[str], list[list[str]]]:
    header = ["adapters", "shared A", *(QUANTITY_TITLES[q] for q in QUANTITIES)]
    rows = []
    for s in report["sets"]:
        if "similarity" in s:
            m = s["similarity"]["mean"]
            rows.append([s["adapters"], "yes" if s["shared_a"] else "no", *(f"{m[q]:.4f}" for q in QUANTITIES)])
    return header, rows


def fidelity_table(report: dict) -> tuple[list[str], list[list[str]]]:
    header = [
        "adapters",
        "scheme",
        "positions",
        "greedy agree %",
        "KL mean",
        "KL median",
        "KL p95",
        "KL max",
        "reused tok/reader",
    ]
    rows = []
    for s in report["sets"]:
        gap = s.get("role_gap")
        if gap and gap["positions"]:
            rows.append(
                [
                    s["adapters"],
                    "role gap (no sharing)",
                    str(gap["positions"]),
                    f"{100 * gap['agreement']:.2f}",
                    f"{gap['kl_mean']:.4f}",
                    f"{gap['kl_median']:.4f}",
                    f"{gap['kl_p95']:.4f}",
                    f"{gap['kl_max']:.2f}",
                    "-",
                ]
            )
        for f in s["fidelity"]:
            name = f["scheme"] + (" (forced, unshared A)" if f["forced"] else "")
            reused = f["reused_tokens_mean"] if f["scheme"] != "base_shared" else f["base_reused_tokens_mean"]
            rows.append(
                [
                    s["adapters"],
                    name,
                    str(f["positions"]),
                    f"{100 * f['agreement']:.2f}",
                    f"{f['kl_mean']:.4f}",
                    f"{f['kl_median']:.4f}",
                    f"{f['kl_p95']:.4f}",
                    f"{f['kl_max']:.2f}",
                    f"{reused:.0f}" + (" (K/V_base)" if f["scheme"] == "base_shared" else ""),
                ]
            )
    return header, rows


def format_markdown(report: dict) -> str:
    spec = report["spec"]
    parts = [
        f"Trajectories: {spec['trajectories']} (first {spec['limit']} with enough tokens, cut to {spec['max_tokens']} "
        f"tokens); handoff window {spec['window']} tokens; pairs {', '.join(a + '->' + b for a, b in spec['pairs'])}; "
        f"model {spec['model']}; {report['machine']['date']}.",
        "",
        "Cosine similarity across agent pairs (each agent's own pass), averaged over tokens, pairs and layers:",
        "",
        _md_table(*similarity_table(report)),
        "",
        "Handoff fidelity vs non_shared (reader's next-token distribution on the window after the producer's prefix). "
        "The role-gap row compares the reader's own distribution with the producer's own one at the same positions: "
        "the scale of what the adapters change, which a sharing error should stay well below.",
        "",
        _md_table(*fidelity_table(report)),
    ]
    return "\n".join(parts) + "\n"


def print_tables(report: dict) -> None:
    try:
        from rich.console import Console  # noqa: PLC0415
        from rich.table import Table  # noqa: PLC0415
    except ImportError:
        print(format_markdown(report))
        return
    console = Console(width=max(150, Console().width))
    for title, (header, rows) in (
        ("cosine similarity across agents (Table 1)", similarity_table(report)),
        ("handoff fidelity vs non_shared", fidelity_table(report)),
    ):
        table = Table(title=title)
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i < 2 else "right")
        for r in rows:
            table.add_row(*r)
        console.print(table)


def write_plot(report: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    sets = report["sets"]
    fig, axes = plt.subplots(len(sets), 2, figsize=(13, 4.2 * len(sets)), squeeze=False)
    for row, s in enumerate(sets):
        ax = axes[row][0]
        if "similarity" in s:
            for q in QUANTITIES:
                values = s["similarity"]["per_layer"][q]
                ax.plot(
                    range(len(values)),
                    values,
                    marker=".",
                    label=f"{QUANTITY_TITLES[q]} ({sum(values) / len(values):.3f})",
                )
        ax.set_xlabel("layer")
        ax.set_ylabel("cosine similarity across agents")
        ax.set_title(f"{s['adapters']}: each agent's own pass")
        ax.set_ylim(-0.3, 1.05)
        ax.legend(fontsize=7)
        ax = axes[row][1]
        floor = 1e-4
        gap = s.get("role_gap") or {}
        if gap.get("hidden_rel_err_per_layer"):
            values = gap["hidden_rel_err_per_layer"]
            ax.plot(
                range(len(values)),
                [max(v, floor) for v in values],
                color="grey",
                linestyle="--",
                label=(
                    "role gap (reader vs producer, no sharing): "
                    f"KL {gap['kl_mean']:.3f}, agree {100 * gap['agreement']:.1f}%"
                ),
            )
        for f in s["fidelity"]:
            values = f["hidden_rel_err_per_layer"]
            forced = " (forced)" if f["forced"] else ""
            label = f"{f['scheme']}{forced}: KL {f['kl_mean']:.4f}, agree {100 * f['agreement']:.1f}%"
            ax.plot(range(len(values)), [max(v, floor) for v in values], marker=".", label=label)
        ax.set_yscale("log")
        ax.set_ylim(floor * 0.8, None)
        ax.set_xlabel(f"layer (last: final norm; exact 0 drawn at {floor:g})")
        ax.set_ylabel("reader hidden state rel. error vs non_shared")
        ax.set_title(f"{s['adapters']}: handoff (producer prefix, reader window)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "analyze.json", "md": out / "analyze.md", "png": out / "analyze.png"}
    paths["json"].write_text(json.dumps(report, indent=1), encoding="utf-8")
    paths["md"].write_text(format_markdown(report), encoding="utf-8")
    write_plot(report, paths["png"])
    return paths


# ---- end-to-end agreement from an eval run ------------------------------------------------------------------------


def answer_agreement(eval_json: str | Path, reference: str = "non_shared") -> list[dict]:
    """Per (dataset, adapters, scheme) of an `lragent eval` JSON: how often the final answer (and, with saved
    trajectories, the whole trajectory) equals the `reference` scheme's on the same question. Only meaningful for
    greedy runs, where non_shared is deterministic."""
    payload = json.loads(Path(eval_json).read_text(encoding="utf-8"))
    ref = {(q["dataset"], q["adapters"], q["id"]): q for q in payload["questions"] if q["scheme"] == reference}
    groups: dict[tuple[str, str, str], list[tuple[dict, dict]]] = {}
    for q in payload["questions"]:
        r = ref.get((q["dataset"], q["adapters"], q["id"]))
        if r is not None:
            groups.setdefault((q["dataset"], q["adapters"], q["scheme"]), []).append((q, r))
    rows = []
    for (dataset, adapters, scheme), items in groups.items():
        same_traj = [q.get("trajectory") == r.get("trajectory") for q, r in items if r.get("trajectory")]
        rows.append(
            {
                "dataset": dataset,
                "adapters": adapters,
                "scheme": scheme,
                "n": len(items),
                "same_answer": sum(q["prediction"] == r["prediction"] for q, r in items) / len(items),
                "same_trajectory": sum(same_traj) / len(same_traj) if same_traj else None,
                "correct": sum(q["correct"] for q, _ in items),
                "reference_correct": sum(r["correct"] for _, r in items),
            }
        )
    return rows


def print_answer_agreement(rows: list[dict], reference: str = "non_shared") -> None:
    header = ["dataset", "adapters", "scheme", "n", f"same answer as {reference} %", "same trajectory %", "correct"]
    table = [
        [
            r["dataset"],
            r["adapters"],
            r["scheme"],
            str(r["n"]),
            f"{100 * r['same_answer']:.0f}",
            "-" if r["same_trajectory"] is None else f"{100 * r['same_trajectory']:.0f}",
            str(r["correct"]),
        ]
        for r in rows
    ]
    print(_md_table(header, table))


# ---- CLI ------------------------------------------------------------------------------------------------------


def parse_pairs(text: str) -> list[tuple[str, str]]:
    text = text.strip().lower()
    if text == "handoff":
        return list(HANDOFF_PAIRS)
    if text == "all":
        return [(a, b) for a in ROLES for b in ROLES if a != b]
    pairs = []
    for item in text.split(","):
        a, sep, b = item.strip().replace("->", ":").partition(":")
        if not sep or a not in ROLES or b not in ROLES:
            raise ValueError(f"bad pair {item!r}: expected producer:reader with roles {', '.join(ROLES)}")
        pairs.append((a, b))
    return pairs


def parse_schemes(text: str) -> list[str]:
    schemes = [s.strip().lower().replace("-", "_") for s in text.split(",") if s.strip()]
    bad = [s for s in schemes if s not in SCHEMES]
    if bad or not schemes:
        raise ValueError(f"unknown scheme(s) {bad}; choose from {', '.join(SCHEMES)}")
    return schemes


def default_adapter_sets() -> list[AdapterSet]:
    sets = [s for s in find_adapter_sets([DEFAULT_ADAPTER_ROOT]) if s.serves("hotpotqa")]
    # shared-A first: its base_lr_shared is the real scheme, the independent set's is the forced failure mode
    return sorted(sets, key=lambda s: ("shared" not in s.name, s.name))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lragent analyze",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    p.add_argument(
        "--trajectories",
        default=None,
        help="full-trajectories JSON or an eval JSON with saved trajectories (default: AutoAct HotpotQA)",
    )
    p.add_argument(
        "--adapters",
        action="append",
        default=None,
        metavar="DIR",
        help="adapter set folder(s) with plan/, action/, reflect/ (default: the shipped HotpotQA sets)",
    )
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--limit", type=int, default=8, help="trajectories")
    p.add_argument("--max-tokens", type=int, default=1024, help="cut each trajectory to this many tokens")
    p.add_argument("--window", type=int, default=64, help="reader tokens after the handoff point")
    p.add_argument(
        "--pairs",
        default="handoff",
        help="producer:reader pairs, comma-separated, or 'handoff' (plan:action,action:plan,plan:reflect) or "
        "'all' (the 6 ordered pairs); plan:plan is a control (an agent reading its own cache is exact)",
    )
    p.add_argument("--sharing", default=",".join(SCHEMES), help="schemes compared with non_shared")
    p.add_argument(
        "--no-force",
        action="store_true",
        help="skip base_lr_shared on sets without shared A (default: run it forced, labelled)",
    )
    p.add_argument("--control", action="store_true", help="also run non_shared through the handoff (expects KL 0)")
    p.add_argument("--no-similarity", action="store_true", help="skip the Table 1 cosine similarities")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--kv-cache-bytes", type=int, default=256 << 20)
    p.add_argument(
        "--quantization",
        default=None,
        choices=["fp8"],
        help="quantise the compared engines' weights (the non_shared reference stays unquantised): with --control "
        "the non_shared row is the quantisation's own fidelity",
    )
    p.add_argument("--out", default="results/analyze")
    p.add_argument(
        "--replot", metavar="JSON", default=None, help="only rebuild the tables and plot from an analyze.json"
    )
    p.add_argument(
        "--answers",
        metavar="EVAL_JSON",
        default=None,
        help="only compare an `lragent eval` run's answers/trajectories per scheme with non_shared's",
    )
    return p


def spec_from_args(args: argparse.Namespace) -> AnalyzeSpec:
    if args.adapters:
        roots = [r for a in args.adapters for r in a.split(",") if r]
        sets = find_adapter_sets(roots)
        if not sets:
            raise ValueError(f"no adapter set (plan/, action/, reflect/ folders) under {roots}")
    else:
        sets = default_adapter_sets()
        if not sets:
            raise ValueError(f"no shipped HotpotQA adapter sets under {DEFAULT_ADAPTER_ROOT}; pass --adapters DIR")
    if args.limit < 1 or args.window < 1 or args.max_tokens <= args.window:
        raise ValueError("need --limit >= 1, --window >= 1 and --max-tokens > --window")
    return AnalyzeSpec(
        trajectories=str(args.trajectories or default_trajectories()),
        adapter_sets=sets,
        model=args.model,
        limit=args.limit,
        max_tokens=args.max_tokens,
        window=args.window,
        pairs=parse_pairs(args.pairs),
        schemes=parse_schemes(args.sharing),
        force=not args.no_force,
        control=args.control,
        similarity=not args.no_similarity,
        kv_cache_bytes=args.kv_cache_bytes,
        quantization=args.quantization,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.answers:
        print_answer_agreement(answer_agreement(args.answers))
        return 0
    if args.replot:
        report = json.loads(Path(args.replot).read_text(encoding="utf-8"))
        print_tables(report)
        paths = write_report(report, args.out)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        return 0
    try:
        spec = spec_from_args(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"lragent analyze: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run_analysis(spec)
    report["command"] = "lragent analyze " + " ".join(sys.argv[2:] if argv is None else argv)
    print_tables(report)
    paths = write_report(report, args.out)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
