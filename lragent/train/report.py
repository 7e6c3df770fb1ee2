"""The training log (JSON) and loss-curve picture (PNG) written next to an adapter set."""

from __future__ import annotations

import fcntl
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch

from lragent.train.config import TrainConfig
from lragent.train.data import ROLES
from lragent.train.loop import RoleResult

LOG_NAME = "train_log.json"
PLOT_NAME = "loss_curve.png"


def machine_info(device: torch.device) -> dict[str, Any]:
    import peft
    import transformers

    info = {
        "device": str(device),
        "host": platform.node(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def build_log(
    cfg: TrainConfig,
    results: dict[str, RoleResult],
    *,
    task: str,
    model: str,
    device: torch.device,
    total_s: float,
    notes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Settings, machine, and per role: examples, steps, time, tokens, first/last loss and the per-step losses."""
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "task": task,
        "model": model,
        "settings": cfg.to_dict(),
        "machine": machine_info(device),
        "total_time_s": round(total_s, 2),
        "roles": {
            role: {
                **res.summary(),
                "losses": [_json_loss(x) for x in res.losses],
                "skipped": list(res.skipped),
                "eval_steps": list(res.eval_steps),
                "eval_losses": [_json_loss(x) for x in res.eval_losses],
            }
            for role, res in results.items()
        },
        **(notes or {}),
    }


def _json_loss(x: float) -> float | None:
    """A per-step loss for the JSON log: rounded, or null when not finite (a skipped step)."""
    return round(x, 5) if math.isfinite(x) else None


def write_log(log: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Write the set's log, keeping the roles that other runs of the same set already logged there.

    One process per role (``--roles action``, run side by side on one GPU) writes into the same set folder; each
    adds its roles to the log under a file lock, so the set ends with one log of every role. A run of a different
    task or mode replaces the old log rather than mixing with it. Returns the log as written."""
    path = Path(out_dir) / LOG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{LOG_NAME}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = _merge(_read(path), log)
        path.write_text(json.dumps(merged, indent=1) + "\n")
    return merged


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _merge(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """``new`` with ``old``'s other roles kept when both are runs of one set (same task and training mode)."""
    same_set = old is not None and old.get("task") == new.get("task")
    same_set = same_set and (old or {}).get("settings", {}).get("mode") == new.get("settings", {}).get("mode")
    if not same_set or old is None:
        return new
    roles = {r: e for r, e in old.get("roles", {}).items() if r not in new["roles"]}
    roles.update(new["roles"])
    ordered = {r: roles[r] for r in sorted(roles, key=_role_order)}
    total = max(float(old.get("total_time_s", 0.0)), float(new.get("total_time_s", 0.0)))
    return {**new, "roles": ordered, "total_time_s": total}


def _smooth(values: list[float | None], window: int) -> list[float]:
    """Moving mean over the last ``window`` steps, ignoring missing (skipped, non-finite) losses."""
    out = []
    for i in range(len(values)):
        kept = [v for v in values[max(0, i + 1 - window) : i + 1] if v is not None and math.isfinite(v)]
        out.append(sum(kept) / len(kept) if kept else float("nan"))
    return out


def plot_losses(log: dict[str, Any], path: Path) -> Path | None:
    """Loss per optimizer step for each role (raw, faint; 10-step moving mean, solid). None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for role, entry in log["roles"].items():
        losses = [float("nan") if x is None else x for x in entry["losses"]]
        (line,) = ax.plot(range(1, len(losses) + 1), _smooth(losses, 10), label=f"{role} ({entry['time_s']:.0f} s)")
        ax.plot(range(1, len(losses) + 1), losses, color=line.get_color(), alpha=0.25, linewidth=0.8)
        if entry.get("eval_steps"):  # held-out loss: dashed, same colour
            evals = [float("nan") if x is None else x for x in entry["eval_losses"]]
            ax.plot(entry["eval_steps"], evals, "o--", color=line.get_color(), markersize=3, label=f"{role} held-out")
    settings = log["settings"]
    ax.set_title(
        f"{log['task']} / {settings['mode']}: r {settings['rank']}, lr {settings['lr']}, bs {settings['batch_size']}"
    )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (output tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


MANIFEST_NAME = "manifest.json"


def write_manifest(root: Path) -> Path:
    """Index every adapter set under ``root`` (a folder holding ``train_log.json``) into ``root/manifest.json``."""
    root = Path(root)
    sets = {}
    for log_path in sorted(root.glob(f"*/{LOG_NAME}")):
        log = json.loads(log_path.read_text())
        set_dir = log_path.parent
        roles = sorted((p.parent.name for p in set_dir.glob("*/adapter_config.json")), key=_role_order)
        trained = {
            r: {k: e[k] for k in ("steps", "time_s", "loss_first", "loss_last", "examples")}
            | ({"skipped_steps": e["skipped_steps"]} if "skipped_steps" in e else {})  # logs since the NaN guard
            | ({"eval_loss_best": e["eval_loss_best"], "best_step": e["best_step"]} if e.get("best_step") else {})
            for r, e in log["roles"].items()
        }
        sets[set_dir.name] = {
            "task": log["task"],
            "mode": log["settings"]["mode"],
            "model": log["model"],
            "roles": roles,
            "shared_a_modules": list(log["settings"]["shared_modules"])
            if log["settings"]["mode"] != "independent"
            else [],
            "rank": log["settings"]["rank"],
            "alpha": log["settings"]["alpha"],
            "targets": list(log["settings"]["targets"]),
            "machine": log["machine"].get("gpu", log["machine"]["device"]),
            "trained": trained,
            **({"plan_from": log["plan_from"]} if "plan_from" in log else {}),
        }
    path = root / MANIFEST_NAME
    path.write_text(json.dumps(sets, indent=1) + "\n")
    return path


def _role_order(role: str) -> tuple[int, str]:
    return (ROLES.index(role) if role in ROLES else len(ROLES), role)
