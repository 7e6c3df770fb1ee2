"""Hostile adapter folders and names are refused with a clear `AdapterError`, never another exception; an
interrupted model conversion leaves no temp folder behind (issue 11: findings 2, 6, 8 and 10)."""

from __future__ import annotations

import functools
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lragent.adapters import adapter_dir
from lragent.bench.adapters import write_peft_adapter
from lragent.cache.sharing import get_scheme
from lragent.lora.adapter import (
    MAX_NAME_LEN,
    AdapterError,
    LoRAAdapter,
    load_peft_adapter,
    validate_adapter_name,
)
from lragent.lora.registry import AdapterRegistry
from lragent.model_config import ModelConfig
from lragent.models import hub

TINY = ModelConfig.from_dict(
    {
        "model_type": "llama",
        "vocab_size": 100,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
)
CFG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
V_B = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"


@pytest.fixture
def folder(tmp_path, model_config) -> Path:
    """A valid rank-8 q/v adapter for the embedded model, for each test to corrupt."""
    return write_peft_adapter(tmp_path / "agent", model_config, ("q_proj", "v_proj"), rank=8, alpha=16.0)


def refused(folder: Path, config: ModelConfig, match: str) -> str:
    """Load, expect AdapterError matching `match`, and check the message carries no internals."""
    with pytest.raises(AdapterError, match=match) as info:
        load_peft_adapter("agent", folder, config)
    msg = str(info.value)
    assert "Traceback" not in msg and "Error:" not in msg and "safetensors_rust" not in msg
    assert str(folder / WEIGHTS) not in msg and str(folder / CFG) not in msg  # at most the folder as passed
    return msg


def edit_config(folder: Path, **fields) -> None:
    cfg = json.loads((folder / CFG).read_text())
    cfg.update(fields)
    (folder / CFG).write_text(json.dumps(cfg))  # float('nan') / inf become the NaN / Infinity literals


def edit_tensors(folder: Path, change) -> None:
    tensors = load_file(str(folder / WEIGHTS))
    change(tensors)
    save_file(tensors, str(folder / WEIGHTS))


# ---- valid adapters ----------------------------------------------------------------------------------------------
def test_valid_adapter_loads(folder, model_config):
    adapter = load_peft_adapter("agent", folder, model_config)
    assert (adapter.rank, adapter.scaling, adapter.targets) == (8, 2.0, frozenset({"q_proj", "v_proj"}))
    a, b = adapter.weights[(0, "v_proj")]
    assert a.shape == (model_config.hidden_size, 8) and b.shape == (8, model_config.kv_size)


def test_shipped_fp16_adapter_loads(model_config):
    adapter = load_peft_adapter("plan", adapter_dir("hotpotqa-shared-a", "plan"), model_config)
    assert adapter.rank == 8 and adapter.scaling == 2.0


def test_rslora_and_peft_variants_of_valid_fields(folder, model_config):
    edit_config(folder, use_rslora=True, lora_alpha=16, peft_type="lora", rank_pattern={}, use_dora=False)
    assert load_peft_adapter("agent", folder, model_config).scaling == pytest.approx(16 / 8**0.5)


# ---- adapter_config.json -----------------------------------------------------------------------------------------
def test_config_missing(folder, model_config):
    (folder / CFG).unlink()
    refused(folder, model_config, "has no adapter_config.json")


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"", b"\xff\xfe\x00garbage", b'{"r": 1' + b"0" * 5000 + b"}", b'{"r": 8,}'],
    ids=["syntax", "empty", "not-utf8", "5000-digit-int", "trailing-comma"],
)
def test_config_not_json(folder, model_config, raw):
    (folder / CFG).write_bytes(raw)
    refused(folder, model_config, "adapter_config.json is not valid JSON")


def test_config_nested_too_deeply(folder, model_config):
    (folder / CFG).write_text('{"r": ' + "[" * 100_000 + "]" * 100_000 + "}")
    refused(folder, model_config, "nested too deeply")


@pytest.mark.parametrize("raw", ["[8]", '"LORA"', "null", "8"])
def test_config_not_an_object(folder, model_config, raw):
    (folder / CFG).write_text(raw)
    refused(folder, model_config, "must hold a JSON object")


def test_config_huge(folder, model_config):
    edit_config(folder, padding="x" * (1 << 20))
    refused(folder, model_config, "larger than 1048576 bytes")


@pytest.mark.parametrize(
    "rank", [0, -8, None, [8], True, 8.0, "8", 1025, 10**30], ids=lambda r: f"r={type(r).__name__}:{str(r)[:8]}"
)
def test_bad_rank(folder, model_config, rank):
    edit_config(folder, r=rank)
    refused(folder, model_config, "r must be an integer from 1 to 1024")


def test_rank_missing(folder, model_config):
    cfg = json.loads((folder / CFG).read_text())
    del cfg["r"]
    (folder / CFG).write_text(json.dumps(cfg))
    refused(folder, model_config, "r must be an integer")


@pytest.mark.parametrize("alpha", ["16", None, [16], True, {"x": 1}], ids=repr)
def test_alpha_not_a_number(folder, model_config, alpha):
    edit_config(folder, lora_alpha=alpha)
    refused(folder, model_config, "lora_alpha must be a finite number")


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), float("-inf")], ids=repr)
def test_alpha_nan_or_infinity_literal(folder, model_config, alpha):
    edit_config(folder, lora_alpha=alpha)
    refused(folder, model_config, r"not valid JSON \(-?(NaN|Infinity) is not a number\)")


def test_alpha_overflowing_literal(folder, model_config):
    (folder / CFG).write_text('{"peft_type": "LORA", "r": 8, "lora_alpha": 1e400}')  # float() parses it as inf
    refused(folder, model_config, "lora_alpha must be a finite number")


@pytest.mark.parametrize("alpha", [1e300, -1e6, 8193])
def test_alpha_absurd_scaling(folder, model_config, alpha):
    edit_config(folder, lora_alpha=alpha)
    refused(folder, model_config, "gives a scaling beyond")


@pytest.mark.parametrize("rslora", ["yes", 1, None, []], ids=repr)
def test_rslora_not_a_bool(folder, model_config, rslora):
    edit_config(folder, use_rslora=rslora)
    refused(folder, model_config, "use_rslora must be true or false")


@pytest.mark.parametrize("peft_type", [5, None, ["LORA"], "LOHA", "\ud800"], ids=repr)
def test_bad_peft_type(folder, model_config, peft_type):
    edit_config(folder, peft_type=peft_type)
    refused(folder, model_config, "peft_type .* is not LORA")


@pytest.mark.parametrize(
    "variant",
    [
        {"use_dora": True},
        {"alpha_pattern": {"q_proj": 64}},
        {"rank_pattern": {"v_proj": 4}},
        {"modules_to_save": ["lm_head"]},
    ],
    ids=lambda v: next(iter(v)),
)
def test_unsupported_peft_variants(folder, model_config, variant):
    edit_config(folder, **variant)
    refused(folder, model_config, f"{next(iter(variant))} is not supported")


# ---- adapter_model.safetensors -----------------------------------------------------------------------------------
def test_weights_missing(folder, model_config):
    (folder / WEIGHTS).unlink()
    refused(folder, model_config, "has no adapter_model.safetensors")


def test_pickle_refused(folder, model_config):
    torch.save(load_file(str(folder / WEIGHTS)), folder / "adapter_model.bin")
    (folder / WEIGHTS).unlink()
    refused(folder, model_config, r"adapter_model.bin \(a pickle\) is not loaded.*convert it to adapter_model.safe")


def test_weights_empty(folder, model_config):
    (folder / WEIGHTS).write_bytes(b"")
    refused(folder, model_config, "adapter_model.safetensors is empty")


@pytest.mark.parametrize("cut", [2, 9, 100, -10], ids=lambda c: f"cut={c}")
def test_weights_truncated(folder, model_config, cut):
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[:cut])
    refused(folder, model_config, "cannot parse adapter_model.safetensors")


@pytest.mark.parametrize(
    "raw",
    [
        os.urandom(4096),
        struct.pack("<Q", 5) + b"{abcd",
        struct.pack("<Q", 2) + b"[]",
        struct.pack("<Q", 10**12) + b"{}",
        b"PK\x03\x04" + b"\0" * 60,
    ],
    ids=["random", "bad-json-header", "array-header", "header-too-large", "zip"],
)
def test_weights_garbage_or_wrong_header(folder, model_config, raw):
    (folder / WEIGHTS).write_bytes(raw)
    refused(folder, model_config, "cannot parse adapter_model.safetensors")


def test_weights_file_too_large_is_refused_before_reading(tmp_path):
    folder = write_peft_adapter(tmp_path / "big", TINY, rank=4)
    with (folder / WEIGHTS).open("r+b") as handle:  # sparse: no disk or time spent
        handle.truncate(64 << 20)
    refused(folder, TINY, r"adapter_model.safetensors is 67108864 bytes, more than \d+ for this model")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool, torch.complex64], ids=str)
def test_weights_not_floating_point(folder, model_config, dtype):
    edit_tensors(folder, lambda t: t.__setitem__(V_B, t[V_B].to(dtype)))
    refused(folder, model_config, f"tensor '{V_B}' has dtype {dtype}, not floating point")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=repr)
def test_weights_non_finite_name_the_tensor(folder, model_config, bad):
    def poison(tensors):
        tensors[V_B][3, 1] = bad
        tensors[V_B.replace("layers.1.", "layers.2.")][0, 0] = bad  # a later tensor: the message names the first

    edit_tensors(folder, poison)
    refused(folder, model_config, f"tensor '{V_B}' contains NaN or Inf values")


def test_weights_overflowing_float32(folder, model_config):
    edit_tensors(folder, lambda t: t.__setitem__(V_B, t[V_B].double().fill_(1e300)))
    refused(folder, model_config, f"tensor '{V_B}' contains NaN or Inf values")


def test_weights_beyond_fp16_range(folder, model_config):
    edit_tensors(folder, lambda t: t[V_B].__setitem__((0, 0), 1e6))
    refused(folder, model_config, f"tensor '{V_B}' has values beyond")


def test_weights_float16_and_bfloat16_accepted(folder, model_config):
    edit_tensors(
        folder, lambda t: t.update({k: v.to(torch.bfloat16 if "q_proj" in k else torch.float16) for k, v in t.items()})
    )
    assert load_peft_adapter("agent", folder, model_config).weights[(0, "q_proj")][0].dtype == torch.float32


def test_weights_layer_index_with_thousands_of_digits(folder, model_config):
    key = "base_model.model.model.layers." + "9" * 5000 + ".self_attn.q_proj.lora_A.weight"
    edit_tensors(folder, lambda t: t.__setitem__(key, torch.zeros(8, model_config.hidden_size)))
    msg = refused(folder, model_config, "unsupported LoRA tensor")
    assert len(msg) < 400


def test_weights_duplicate_half(folder, model_config):
    dup = V_B.replace("lora_B.weight", "lora_B.default.weight")
    edit_tensors(folder, lambda t: t.__setitem__(dup, t[V_B].clone()))
    refused(folder, model_config, "layer 1 v_proj has lora_B twice")


def test_weights_wrong_shape_still_refused(folder, model_config):
    edit_tensors(folder, lambda t: t.__setitem__(V_B, t[V_B][:, :4].contiguous()))
    refused(folder, model_config, "another base model")


# ---- names -------------------------------------------------------------------------------------------------------
BAD_NAMES = {
    "": "empty",
    "x" * (MAX_NAME_LEN + 1): "129 characters long",
    "x" * 200_000: "200000 characters long",
    "a b": "whitespace",
    "tab\t": "whitespace",
    "\u3000wide": "whitespace",
    "nul\x00": "control character",
    "esc\x1b[31m": "control character",
    "lone\ud800": "lone surrogate",
    "zero\u200bwidth": "invisible format character",
    "<base>": "reserved",
}


@pytest.mark.parametrize("name", BAD_NAMES, ids=lambda n: repr(n[:12]))
def test_bad_names_refused_everywhere(tmp_path, name):
    problem = BAD_NAMES[name]
    with pytest.raises(AdapterError, match=problem) as info:
        validate_adapter_name(name)
    assert len(str(info.value)) < 200  # a 200k-character name is never echoed whole
    with pytest.raises(AdapterError, match=problem):
        load_peft_adapter(name, tmp_path, TINY)  # checked before any file is touched
    registry = AdapterRegistry(get_scheme("non_shared"), TINY.num_layers, max_loras=4)
    with pytest.raises(AdapterError, match=problem):
        registry.check(LoRAAdapter(name=name, rank=4, scaling=1.0, targets=frozenset(), weights={}))


@pytest.mark.parametrize("name", [None, 5, b"plan"], ids=repr)
def test_name_not_a_string(name):
    with pytest.raises(AdapterError, match="adapter name must be a string"):
        validate_adapter_name(name)


@pytest.mark.parametrize("name", ["plan", "x" * MAX_NAME_LEN, "agent-é_1.v2", "org/role:latest", "计划"])
def test_good_names_accepted(name):
    validate_adapter_name(name)


# ---- property test -----------------------------------------------------------------------------------------------
@functools.cache
def tiny_valid_files() -> tuple[bytes, dict]:
    """One valid rank-4 adapter for TINY: (weights bytes, config dict)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_peft_adapter(Path(tmp) / "a", TINY, ("q_proj", "v_proj", "down_proj"), rank=4, alpha=8.0)
        return (folder / WEIGHTS).read_bytes(), json.loads((folder / CFG).read_text())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
MISSING = object()
VALID_VALUES = {
    "r": [4, 4, 8],
    "lora_alpha": [8, 8.0, -0.5],
    "use_rslora": [False, True],
    "peft_type": ["LORA", "lora"],
}


@st.composite
def config_fields(draw) -> dict:
    """Each field valid three times in four (so later checks are reached too), else absent or any JSON value."""
    fields = {}
    for key, valid in VALID_VALUES.items():
        hostile = draw(st.integers(0, 3)) == 0
        fields[key] = draw(st.just(MISSING) | json_values) if hostile else draw(st.sampled_from(valid))
    return fields


@st.composite
def weights_bytes(draw) -> bytes:
    """The valid file, random bytes, a truncation of the valid file, or the valid file with a few bytes changed."""
    valid = tiny_valid_files()[0]
    kind = draw(st.sampled_from(["valid", "valid", "random", "truncated", "mutated", "mutated"]))
    if kind == "random":
        return draw(st.binary(max_size=512))
    if kind == "truncated":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    data = bytearray(valid)
    if kind == "mutated":
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fields=config_fields(), weights=weights_bytes())
def test_property_load_returns_adapter_or_adapter_error(fields, weights):
    cfg = dict(tiny_valid_files()[1])
    for key, value in fields.items():
        if value is MISSING:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / CFG).write_text(json.dumps(cfg))
        (Path(tmp) / WEIGHTS).write_bytes(weights)
        try:
            adapter = load_peft_adapter("agent", tmp, TINY)
        except AdapterError as exc:
            assert "Traceback" not in str(exc) and len(str(exc)) < 1000
            return
    assert 1 <= adapter.rank <= 1024 and abs(adapter.scaling) <= 1024
    for a, b in adapter.weights.values():
        assert a.dtype == b.dtype == torch.float32 and torch.isfinite(a).all() and torch.isfinite(b).all()


# ---- model conversion temp folders -------------------------------------------------------------------------------
@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit, RuntimeError])
def test_interrupted_conversion_leaves_no_tmp_folder(tmp_path, monkeypatch, error):
    import transformers

    out = tmp_path / "cache" / "model"
    tmp = out.with_name(f"model.tmp{os.getpid()}")

    def loader(*args, **kwargs):
        assert tmp.is_dir()  # the conversion really had started writing
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise error("interrupted")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", loader)
    with pytest.raises(error):
        hub.convert_gguf(tmp_path / "model.gguf", out)
    assert list((tmp_path / "cache").iterdir()) == []


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_tmp_folders_of_dead_converters_removed(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"x")
    (out / "config.json").write_text("{}")
    stale = tmp_path / f"model.tmp{dead_pid()}"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "model.safetensors").write_bytes(b"partial")
    kept = [
        tmp_path / f"model.tmp{os.getpid()}",  # alive: this process
        tmp_path / f"model.tmp{os.getppid()}",  # alive: the parent
        tmp_path / f"other.tmp{dead_pid()}",  # another model's folder
        tmp_path / "model.tmpabc",  # not a pid
    ]
    for path in kept:
        path.mkdir()
    file_like = tmp_path / f"model.tmp{dead_pid()}0"  # a file, not a folder: not ours to delete
    file_like.write_text("x")
    assert hub.convert_gguf(tmp_path / "model.gguf", out) == out  # already converted: only the cleanup runs
    assert not stale.exists()
    assert all(path.is_dir() for path in kept) and file_like.is_file() and (out / "config.json").is_file()


def test_sigterm_during_conversion_then_next_start_cleans(tmp_path):
    """A real SIGTERM kills the converter outright (no handler is installed); the next call removes its folder."""
    out = tmp_path / "model"
    script = (
        "import sys, time; from pathlib import Path; from lragent.models import hub\n"
        "def slow(gguf, tmp):\n    print('started', flush=True); time.sleep(60)\n"
        "hub._write_converted = slow\nhub.convert_gguf(Path('x.gguf'), Path(sys.argv[1]))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "started"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == -signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    leftover = tmp_path / f"model.tmp{proc.pid}"
    assert leftover.is_dir()
    assert hub.remove_stale_tmp_dirs(out) == [leftover] and not leftover.exists()
