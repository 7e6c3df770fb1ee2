"""Loading one PEFT LoRA folder and checking it against the base model.

Adapter folders may come from anyone (a runtime load on a server), so every field and byte is validated here and
every failure is an `AdapterError` with a short reason: a bad file must never crash the engine, and non-finite
weights or scales must never reach a cache shared with other agents.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from lragent.model_config import ModelConfig

LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# at most 6 layer digits: int() of a 5000-digit string raises, and no model has a million layers
_KEY = re.compile(r"layers\.(\d{1,6})\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])(?:\.default)?\.weight$")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"

MAX_NAME_LEN = 128
MAX_RANK = 1024  # far above any practical LoRA rank; bounds the memory a config can make us allocate
MAX_SCALING = 1024.0  # |alpha / r| beyond this only overflows activations
MAX_WEIGHT = 65504.0  # largest finite float16: the bank may store weights in fp16, where larger values become inf
MAX_CONFIG_BYTES = 1 << 20  # PEFT configs are ~2 KB
MAX_WEIGHTS_BYTES = 4 << 30
_BAD_NAME_CATEGORIES = {"Cc": "a control character", "Cf": "an invisible format character", "Cs": "a lone surrogate"}


class AdapterError(ValueError):
    """An adapter that cannot be used with this base model or sharing scheme."""


@dataclass
class LoRAAdapter:
    """One agent's adapter. `weights[(layer, module)] = (A, B)` with A: [d_in, r] and B: [r, d_out] (math layout)."""

    name: str
    rank: int
    scaling: float
    targets: frozenset[str]
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    path: str = ""

    def value_down(self, layer: int) -> torch.Tensor | None:
        """v_proj `A` of a layer: the matrix that must be shared for BASE_LR_SHARED."""
        pair = self.weights.get((layer, "v_proj"))
        return None if pair is None else pair[0]

    def key_down(self, layer: int) -> torch.Tensor | None:
        """k_proj `A` of a layer: under BASE_LR_SHARED the key LR X A_k is shared like the value's, so it too must be
        one matrix across adapters."""
        pair = self.weights.get((layer, "k_proj"))
        return None if pair is None else pair[0]


def _short(text: str, limit: int = 40) -> str:
    """repr of untrusted text, cut so that a hostile 200k-character value cannot bloat an error message or a log."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def validate_adapter_name(name: str) -> None:
    """Refuse names that could not be shown, logged or used as a model id safely (the server calls this too)."""
    if not isinstance(name, str):
        raise AdapterError(f"adapter name must be a string, got {type(name).__name__}")
    if not name:
        raise AdapterError("adapter name is empty")
    if len(name) > MAX_NAME_LEN:
        raise AdapterError(f"adapter name {_short(name)} is {len(name)} characters long (at most {MAX_NAME_LEN})")
    if name.startswith("<"):
        raise AdapterError(f"invalid adapter name {_short(name)}: names starting with '<' are reserved")
    for char in name:
        if char.isspace():
            raise AdapterError(f"invalid adapter name {_short(name)}: it contains whitespace")
        problem = _BAD_NAME_CATEGORIES.get(unicodedata.category(char))
        if problem:
            raise AdapterError(f"invalid adapter name {_short(name)}: it contains {problem}")


def load_peft_adapter(name: str, path: str | Path, config: ModelConfig) -> LoRAAdapter:
    """Read `adapter_config.json` + `adapter_model.safetensors`, validate every field, shape and value."""
    validate_adapter_name(name)
    if not isinstance(path, str | Path):
        raise AdapterError(f"adapter {name!r}: the path must be a string, got {type(path).__name__}")
    shown = _short(str(path), 200)  # the folder as the caller gave it: never a resolved absolute path
    folder = Path(path).expanduser()
    try:
        cfg = _read_config(folder, name, shown)
        rank, scaling = _rank_and_scaling(cfg, name)
        tensors = _read_tensors(folder, name, shown, _max_weights_bytes(config, rank))
    except OSError as exc:  # permission denied, name too long, I/O error: the OS reason, without the path
        raise AdapterError(f"adapter {name!r}: cannot read {shown}: {exc.strerror or 'I/O error'}") from exc
    weights = _pair_tensors(name, tensors, config, rank)
    targets = frozenset(module for _, module in weights)
    return LoRAAdapter(name=name, rank=rank, scaling=scaling, targets=targets, weights=weights, path=str(folder))


def _read_config(folder: Path, name: str, shown: str) -> dict[str, Any]:
    """The parsed config object; bounded read, and JSON's NaN / Infinity literals refused at parse time."""
    cfg_file = folder / CONFIG_FILE
    if not cfg_file.is_file():
        raise AdapterError(f"adapter {name!r}: {shown} has no {CONFIG_FILE} (not a PEFT LoRA folder)")
    with cfg_file.open("rb") as handle:  # read at most the cap: st_size lies for /proc files and grows under us
        raw = handle.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterError(f"adapter {name!r}: {CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        cfg = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, 4300-digit ints, deep nesting
        reason = "nested too deeply" if isinstance(exc, RecursionError) else _reason(exc)
        raise AdapterError(f"adapter {name!r}: {CONFIG_FILE} is not valid JSON ({reason})") from exc
    if not isinstance(cfg, dict):
        raise AdapterError(f"adapter {name!r}: {CONFIG_FILE} must hold a JSON object, not {_json_type(cfg)}")
    return cfg


def _reject_constant(literal: str) -> float:
    """json's hook for the non-standard NaN / Infinity / -Infinity literals, which Python accepts by default."""
    raise ValueError(f"{literal} is not a number")


def _reason(exc: BaseException, path: Path | None = None) -> str:
    """First line of a library's message, bounded and without `path`: enough to act on, never a traceback, a dump
    of the input or a resolved path."""
    text = str(exc) if path is None else str(exc).replace(str(path), path.name)
    lines = text.splitlines()
    return lines[0][:160] if lines and lines[0] else "malformed"


def _json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for messages a user of any language can read."""
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array"}
    return "null" if value is None else names.get(type(value), "an object")


def _rank_and_scaling(cfg: dict[str, Any], name: str) -> tuple[int, float]:
    """Type- and range-check the fields that decide shapes and the output scale; refuse unsupported variants."""
    peft_type = cfg.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        shown = _short(peft_type) if isinstance(peft_type, str) else _json_type(peft_type)
        raise AdapterError(f"adapter {name!r}: peft_type {shown} is not LORA")
    for variant in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save"):
        if cfg.get(variant):  # would load with silently wrong weights or scales
            raise AdapterError(f"adapter {name!r}: {variant} is not supported")
    rank = cfg.get("r")
    if type(rank) is not int or not 1 <= rank <= MAX_RANK:  # bool is an int subclass: `type` rules it out
        got = rank if type(rank) is int else _json_type(rank)
        raise AdapterError(f"adapter {name!r}: r must be an integer from 1 to {MAX_RANK}, got {got}")
    alpha = cfg.get("lora_alpha", rank)
    if type(alpha) not in (int, float) or not math.isfinite(alpha):  # 1e400 parses as inf
        raise AdapterError(f"adapter {name!r}: lora_alpha must be a finite number, got {_json_type(alpha)}")
    rslora = cfg.get("use_rslora", False)
    if type(rslora) is not bool:
        raise AdapterError(f"adapter {name!r}: use_rslora must be true or false, got {_json_type(rslora)}")
    scaling = float(alpha) / (math.sqrt(rank) if rslora else rank)  # alpha > 1e308 overflows float(): refused above
    if not math.isfinite(scaling) or abs(scaling) > MAX_SCALING:
        raise AdapterError(f"adapter {name!r}: lora_alpha {alpha:.4g} gives a scaling beyond ±{MAX_SCALING:g}")
    return rank, scaling


def _max_weights_bytes(config: ModelConfig, rank: int) -> int:
    """A generous size cap for the weights file: float64 A and B on every module of every layer, twice, plus slack."""
    per_layer = sum(d_in + d_out for d_in, d_out in config.module_shapes().values()) * rank
    return min(MAX_WEIGHTS_BYTES, 16 * per_layer * config.num_layers + (16 << 20))


def _read_tensors(folder: Path, name: str, shown: str, max_bytes: int) -> dict[str, torch.Tensor]:
    """Parse the safetensors file after a size check; torch pickles are refused (they can run code on load)."""
    st = folder / WEIGHTS_FILE
    if not st.is_file():
        if (folder / PICKLE_FILE).is_file():
            raise AdapterError(
                f"adapter {name!r}: {PICKLE_FILE} (a pickle) is not loaded for safety; convert it to "
                f"{WEIGHTS_FILE}, e.g. with PeftModel.save_pretrained(..., safe_serialization=True)"
            )
        raise AdapterError(f"adapter {name!r}: {shown} has no {WEIGHTS_FILE}")
    size = st.stat().st_size
    if size == 0:
        raise AdapterError(f"adapter {name!r}: {WEIGHTS_FILE} is empty")
    if size > max_bytes:
        raise AdapterError(f"adapter {name!r}: {WEIGHTS_FILE} is {size} bytes, more than {max_bytes} for this model")
    try:
        return load_file(str(st))
    except Exception as exc:  # SafetensorError and friends: a truncated, garbage or hand-edited file
        reason = _reason(exc, st)
        reason = reason.removeprefix("Error while deserializing header: ").removeprefix("Error while deserializing ")
        raise AdapterError(f"adapter {name!r}: cannot parse {WEIGHTS_FILE} ({reason})") from exc


def _checked_float(name: str, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """float32 copy of one LoRA tensor, refused unless floating point, finite and within fp16 range."""
    if not tensor.is_floating_point():
        raise AdapterError(f"adapter {name!r}: tensor {_short(key, 120)} has dtype {tensor.dtype}, not floating point")
    out = tensor.float()
    if not torch.isfinite(out).all():
        raise AdapterError(f"adapter {name!r}: tensor {_short(key, 120)} contains NaN or Inf values")
    if out.numel() and out.abs().max().item() > MAX_WEIGHT:
        raise AdapterError(f"adapter {name!r}: tensor {_short(key, 120)} has values beyond ±{MAX_WEIGHT:g}")
    return out


def _pair_tensors(
    name: str, tensors: dict[str, torch.Tensor], config: ModelConfig, rank: int
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    halves = _collect_halves(name, tensors, config)
    shapes = config.module_shapes()
    weights = {}
    for (layer, module), pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"adapter {name!r}: layer {layer} {module} lacks lora_{'AB'[int('A' in pair)]}")
        d_in, d_out = shapes[module]
        a, b = pair["A"], pair["B"]  # PEFT layout: A [r, d_in], B [d_out, r]
        if a.shape != (rank, d_in) or b.shape != (d_out, rank):
            raise AdapterError(
                f"adapter {name!r}: layer {layer} {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, expected "
                f"({rank}, {d_in}) and ({d_out}, {rank}) for this base model: it was trained for another base model"
            )
        weights[(layer, module)] = (a.t().contiguous(), b.t().contiguous())
    return weights


def _collect_halves(
    name: str, tensors: dict[str, torch.Tensor], config: ModelConfig
) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """Group checked LoRA tensors by (layer, module); sorted keys make "the first offending tensor" deterministic."""
    shapes = config.module_shapes()
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key in sorted(tensors):
        match = _KEY.search(key)
        if match is None:
            if "lora" in key:
                raise AdapterError(f"adapter {name!r}: unsupported LoRA tensor {_short(key, 120)}")
            continue
        layer, module, half = int(match[1]), match[2], match[3]
        if module not in shapes:
            raise AdapterError(f"adapter {name!r}: target {_short(module)} is not one of {', '.join(LORA_MODULES)}")
        if layer >= config.num_layers:
            raise AdapterError(
                f"adapter {name!r} has layer {layer} but the base model has {config.num_layers} layers: "
                "it was trained for another base model"
            )
        pair = halves.setdefault((layer, module), {})
        if half in pair:
            raise AdapterError(f"adapter {name!r}: layer {layer} {module} has lora_{half} twice")
        pair[half] = _checked_float(name, key, tensors[key])
    if not halves:
        raise AdapterError(f"adapter {name!r}: no LoRA weights found")
    return halves


def unshared_value_layers(adapters: list[LoRAAdapter], num_layers: int) -> list[int]:
    """Layers whose v_proj `A` (or k_proj `A`) is not bitwise identical across all adapters (empty = shared-A)."""
    if len(adapters) < 2:
        return []
    return [layer for layer in range(num_layers) if not _same_down(adapters, layer)]


def _same_down(adapters: list[LoRAAdapter], layer: int) -> bool:
    for down in (LoRAAdapter.value_down, LoRAAdapter.key_down):
        first = down(adapters[0], layer)
        for other in adapters[1:]:
            mat = down(other, layer)
            if first is None or mat is None:
                same = first is None and mat is None
            else:
                same = first.shape == mat.shape and torch.equal(first, mat)
            if not same:
                return False
    return True


def default_sharing(adapters: list[LoRAAdapter], num_layers: int, allow_unshared_a: bool = False) -> tuple[str, str]:
    """The sharing scheme `sharing="auto"` resolves to for these adapters, and why (one rule for every entry point).

    k_proj adapters make keys agent-specific -> non_shared (exact); every v_proj A the same matrix (shared-A, or at
    most one adapter) or `allow_unshared_a` -> base_lr_shared (nothing recomputed across agents); otherwise
    base_shared (each agent computes its own low-rank cache over shared prefixes).
    """
    keyed = [a.name for a in adapters if "k_proj" in a.targets]
    if keyed:
        return "non_shared", f"adapter(s) {', '.join(keyed)} adapt k_proj (non_shared keeps their keys exact)"
    if allow_unshared_a:
        return "base_lr_shared", "allow_unshared_a is set"
    layers = unshared_value_layers(adapters, num_layers)
    if layers:
        return "base_shared", f"the adapters' v_proj A differ in {len(layers)} layer(s)"
    if len(adapters) < 2:
        return "base_lr_shared", f"{len(adapters)} adapter(s) loaded: nothing to differ"
    return "base_lr_shared", f"all {len(adapters)} adapters share their v_proj A"
