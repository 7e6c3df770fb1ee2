"""Packaging a user can trust: every third-party import declared (core or the right extra), the license file, the
Python versions, the server's missing-extra message; and the vLLM-shaped command line (parse only, no server)."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch

from lragent.config import EngineConfig
from lragent.engine_args import add_engine_args, engine_config
from lragent.server import cli as serve_cli

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "lragent"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]

# import name -> distribution name, where they differ beyond case and -/_ (extend when a new package is imported)
DISTRIBUTIONS = {
    "yaml": "pyyaml",
    "sklearn": "scikit-learn",
    "PIL": "pillow",
    "cv2": "opencv-python",
    "bs4": "beautifulsoup4",
    "google.protobuf": "protobuf",
    "flashinfer": "flashinfer-python",
}
# Which extra a module-level import may come from, by the file's place in the package: the library (the core) must
# import without any extra, so an extra's package imported there must be imported lazily (inside a function).
AREA_EXTRAS = {"server": "server", "train": "train", "eval": "eval", "bench": "bench", "kernels": "gpu"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    assert match, req
    return _norm(match[1])


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    core = {_requirement_name(r) for r in PROJECT["dependencies"]}
    extras = {
        extra: {_requirement_name(r) for r in reqs if not r.startswith(PROJECT["name"])}
        for extra, reqs in PROJECT["optional-dependencies"].items()
    }
    return core, extras


def _third_party_imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, distribution, at module level) of every third-party import in a file."""
    tree = ast.parse(path.read_text())
    lazy: set[int] = set()  # ids of imports inside a function (run on first use) or under `if TYPE_CHECKING:`
    for node in ast.walk(tree):
        type_checking = isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        if type_checking or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lazy.update(id(n) for n in ast.walk(node) if isinstance(n, ast.Import | ast.ImportFrom))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top in ("lragent", "__future__"):
                continue
            dist = DISTRIBUTIONS.get(name) or DISTRIBUTIONS.get(top) or top
            found.append((node.lineno, _norm(dist), id(node) not in lazy))
    return found


def test_every_third_party_import_is_declared():
    core, extras = _declared()
    anywhere = core.union(*extras.values())
    problems = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        area_extra = AREA_EXTRAS.get(rel.parts[0])
        for line, dist, top_level in _third_party_imports(path):
            where = f"lragent/{rel}:{line} imports {dist}"
            if dist not in anywhere:
                problems.append(f"{where}, declared nowhere in pyproject.toml")
            elif top_level and dist not in core and (area_extra is None or dist not in extras[area_extra]):
                expected = f"core or [{area_extra}]" if area_extra else "core (or import it lazily)"
                problems.append(f"{where} at module level: declare it in {expected}")
    assert not problems, "\n".join(problems)


def test_extras_layout():
    core, extras = _declared()
    assert {"server", "train", "eval", "bench", "gpu", "structured", "dev", "all"} <= set(extras)
    assert not core & {"fastapi", "uvicorn", "prometheus-client", "starlette", "triton", "matplotlib", "peft"}
    assert {"fastapi", "uvicorn", "prometheus-client", "xgrammar"} <= extras["server"]
    assert extras["gpu"] == {"triton"} and "xgrammar" in extras["structured"]
    assert {"pytest", "hypothesis", "mypy", "ruff", "openai", "httpx"} <= extras["dev"]
    # test-only packages stay out of the library and its runtime extras
    runtime = core.union(*(deps for name, deps in extras.items() if name != "dev"))
    assert not runtime & {"pytest", "hypothesis", "mypy", "ruff"}


def test_library_import_does_not_pull_the_server_stack():
    code = "import sys, lragent, lragent.llm; print(sorted({'fastapi', 'uvicorn', 'matplotlib'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_license_matches_pyproject():
    text = (ROOT / "LICENSE").read_text()
    assert PROJECT["license"] == "Apache-2.0"
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text and "END OF TERMS" in text
    assert "LICENSE" in PROJECT.get("license-files", [])


def test_python_versions_agree():
    low = re.fullmatch(r">=\s*3\.(\d+)", PROJECT["requires-python"].split("#")[0].strip())
    assert low, PROJECT["requires-python"]
    minor = int(low[1])
    assert sys.version_info >= (3, minor)
    assert PYPROJECT["tool"]["ruff"]["target-version"] == f"py3{minor}"
    assert PYPROJECT["tool"]["mypy"]["python_version"] == f"3.{minor}"
    assert f"Programming Language :: Python :: 3.{minor}" in PROJECT["classifiers"]


def test_the_package_needs_nothing_newer_than_python_3_10():
    """No 3.10 interpreter is reachable here (no registry serves one), so 3.10 is checked statically: vermin finds
    the oldest Python every construct and standard-library member of the package and examples needs (the tests run
    on 3.11 in CI and 3.12 on the GPU machine). `.long()` is torch's, not Python 2's `long`."""
    vermin = Path(sys.executable).with_name("vermin")
    if not vermin.exists():
        pytest.fail("vermin is a pinned test dependency (requirements.lock): install it")
    args = [str(vermin), "--no-tips", "-t=3.10-", "--violations", "--eval-annotations", "--exclude", "long", "-q"]
    run = subprocess.run([*args, str(PKG), str(ROOT / "examples")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_dockerfile_serves_with_the_gpu_extras():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM .*cuda", text, re.MULTILINE | re.IGNORECASE) or "cuda" in text.split("FROM")[0]
    assert '".[server,gpu]"' in text
    assert re.search(r'^ENTRYPOINT \["lragent", "serve"', text, re.MULTILINE)


def test_serve_without_the_server_extra_says_what_to_install(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert serve_cli.main(["serve"]) == 1
    err = capsys.readouterr().err
    assert "fastapi" in err and "pip install 'lragent[server]'" in err


# ---- vLLM-shaped command line -------------------------------------------------------------------------------------


def parse_serve(*argv: str) -> argparse.Namespace:
    return serve_cli.build_parser().parse_args(list(argv))


def test_serve_model_positional_and_model_flag():
    args = parse_serve("dummy:tiny", "--port", "9")
    assert args.model_tag == "dummy:tiny" and engine_config(args).model == "dummy:tiny"
    args = parse_serve("--model", "dummy:tiny")
    assert args.model_tag is None and engine_config(args).model == "dummy:tiny"
    assert engine_config(parse_serve("dummy:tiny", "--model", "dummy:tiny")).model == "dummy:tiny"
    with pytest.raises(ValueError, match="two models"):
        engine_config(parse_serve("dummy:a", "--model", "dummy:b"))
    assert serve_cli.main(["serve", "dummy:a", "--model", "dummy:b"]) == 2


def test_lora_modules_is_adapter():
    args = parse_serve(
        "M",
        "--enable-lora",
        "--adapter",
        "plan=/p",
        "--lora-modules",
        "act=/a",
        "ref=/r",
        "--lora-modules",
        '{"name": "crit", "path": "/c", "base_model_name": "M"}',
    )
    assert args.model_tag == "M" and args.enable_lora
    assert args.adapter == [("plan", "/p"), ("act", "/a"), ("ref", "/r"), ("crit", "/c")]
    assert dict(args.adapter) == engine_config(args).adapters
    assert parse_serve().adapter == [] and not parse_serve().enable_lora
    with pytest.raises(SystemExit):
        parse_serve("--lora-modules", "no-equals-sign")


def test_kv_cache_memory_bytes_alias():
    assert parse_serve("--kv-cache-memory-bytes", "512M").kv_cache_bytes == 512 << 20
    assert parse_serve("--kv-cache-bytes", "1G").kv_cache_bytes == 1 << 30
    assert parse_serve().kv_cache_bytes is None


@pytest.mark.parametrize(
    "name, canonical",
    [
        ("half", "float16"),
        ("float16", "float16"),
        ("fp16", "float16"),
        ("bf16", "bfloat16"),
        ("bfloat16", "bfloat16"),
        ("float", "float32"),
        ("fp32", "float32"),
        ("float32", "float32"),
        ("auto", "auto"),
    ],
)
def test_dtype_names(name, canonical):
    assert parse_serve("--dtype", name).dtype == canonical
    config = EngineConfig(dtype=name, device="cpu")
    assert config.dtype == canonical
    expected = {"auto": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    assert config.torch_dtype == expected[canonical]


def test_bad_dtype_is_refused():
    with pytest.raises(SystemExit):
        parse_serve("--dtype", "int8")
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="int8")


def test_device_auto_is_the_default():
    args = parse_serve()
    assert args.device == "auto" and args.sharing == "auto"
    config = engine_config(args)
    assert config.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert EngineConfig(device="auto").device == config.device
    assert EngineConfig().device == "cpu"  # the Python default stays explicit


def test_help_shows_defaults():
    text = serve_cli.build_parser().format_help()
    for flag, default in [("--port", "8000"), ("--device", "auto"), ("--dtype", "auto"), ("--sharing", "auto")]:
        assert re.search(re.escape(flag) + r".*?\(default: " + re.escape(default) + r"\)", text, re.DOTALL), flag
    assert "--kv-cache-memory-bytes" in text and "--lora-modules" in text and "--enable-lora" in text


def test_engine_flags_parse_for_generate_and_chat():
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    parser.add_argument("prompt", nargs="+")
    args = parser.parse_args(["--lora-modules", "a=/a", "--dtype", "half", "--kv-cache-memory-bytes", "64M", "hi"])
    config = engine_config(args)
    assert config.sharing == "auto" and config.dtype == "float16" and config.kv_cache_bytes == 64 << 20
    assert config.adapters == {"a": "/a"} and args.prompt == ["hi"]


# ---- one default sharing scheme ---------------------------------------------------------------------------------


def _loaded(adapters: dict[str, str], model_config):
    from lragent.lora.adapter import load_peft_adapter

    return [load_peft_adapter(n, p, model_config) for n, p in adapters.items()]


def test_auto_sharing_rule(shared_a_adapters, qv_adapters, all_module_adapters, model_config):
    from lragent.lora.adapter import default_sharing

    layers = model_config.num_layers
    assert default_sharing(_loaded(shared_a_adapters, model_config), layers)[0] == "base_lr_shared"
    assert default_sharing(_loaded(qv_adapters, model_config), layers)[0] == "base_shared"
    assert default_sharing(_loaded(qv_adapters, model_config), layers, allow_unshared_a=True)[0] == "base_lr_shared"
    assert default_sharing(_loaded(all_module_adapters, model_config), layers)[0] == "non_shared"
    one = dict(list(qv_adapters.items())[:1])
    assert default_sharing(_loaded(one, model_config), layers)[0] == "base_lr_shared"
    assert default_sharing([], layers)[0] == "base_lr_shared"


def test_engine_resolves_auto_sharing_and_logs_it(tiny_llama, caplog):
    from lragent.engine.llm_engine import LLMEngine

    model, adapters = tiny_llama  # independent q/v adapters: different v_proj A
    caplog.set_level(logging.INFO, logger="lragent.engine.llm_engine")
    engine = LLMEngine(EngineConfig(model=model, adapters=adapters, kv_cache_bytes=8 << 20))
    try:
        assert engine.scheme.mode.value == "base_shared" and engine.config.sharing == "base_shared"
        assert any("sharing scheme base_shared (auto:" in r.getMessage() for r in caplog.records)
    finally:
        engine.close()
