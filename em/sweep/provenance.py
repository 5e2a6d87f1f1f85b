"""What a sweep job ran on: data file hashes, model identity, package versions, git commit, host, times.

Everything here is best effort and never raises: a missing ``git`` or an unreadable file is recorded as
``None`` (with the reason where useful), because provenance must not be what makes a job fail.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from em.utils.io import git_blob_sha1, sha256_file

PACKAGES = ("em", "torch", "lightning", "transformers", "peft", "hydra-core", "omegaconf", "wandb", "submitit")
REPO_ROOT = Path(__file__).resolve().parents[2]


def now_iso() -> str:
    """The current time, UTC, ISO 8601 with seconds."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    """Installed distribution versions (``None`` for one that is not installed); plus Python's."""
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_info(repo: str | os.PathLike = REPO_ROOT) -> dict[str, Any]:
    """``{"commit", "dirty", "untracked", "root"}`` of the checkout holding em (``commit`` None outside one).

    ``dirty``: tracked files differ from the commit; ``untracked``: how many files git does not track (and
    does not ignore), e.g. new modules not committed yet.
    """
    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None, "root": None}
    status = git("status", "--porcelain")
    lines = status.splitlines() if status is not None else None
    return {"commit": commit,
            "dirty": any(not x.startswith("??") for x in lines) if lines is not None else None,
            "untracked": sum(x.startswith("??") for x in lines) if lines is not None else None,
            "root": git("rev-parse", "--show-toplevel")}


def _file_ids(path: Path) -> dict[str, Any]:
    try:
        return {"sha256": sha256_file(path), "blob_sha1": git_blob_sha1(path)}
    except OSError as e:
        return {"error": f"{type(e).__name__}: {e}"}


def dataset_provenance(run_dir: str | os.PathLike, dataset_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The dataset identity: config name/source/recipe, and the training run's data provenance.

    The provenance the training run recorded (``data_stats.json``: source spec, resolved file, sha256 and,
    for recipes, every source with its hashes) is completed with the git blob id of each resolved file.
    """
    out: dict[str, Any] = {k: dataset_cfg.get(k) for k in ("name", "source", "path", "recipe")}
    stats_file = Path(run_dir) / "data_stats.json"
    prov: Any = None
    if stats_file.exists():
        try:
            prov = json.loads(stats_file.read_text(encoding="utf-8")).get("provenance")
        except (OSError, ValueError) as e:
            prov = {"error": f"data_stats.json: {e}"}

    def complete(node: Any) -> Any:
        if isinstance(node, dict):
            node = {k: complete(v) for k, v in node.items()}
            f = node.get("file")
            if isinstance(f, str) and "blob_sha1" not in node and Path(f).is_file():
                node["blob_sha1"] = _file_ids(Path(f)).get("blob_sha1")
            return node
        if isinstance(node, list):
            return [complete(v) for v in node]
        return node

    out["provenance"] = complete(prov)
    return out


def model_provenance(model_cfg: Mapping[str, Any], base_model: str | None) -> dict[str, Any]:
    """``name``, ``name_or_path``, ``revision``, the resolved path, and for a local directory the sha256 of
    its ``config.json`` (and the hub snapshot commit when the path is inside an HF cache snapshot)."""
    out: dict[str, Any] = {k: model_cfg.get(k) for k in ("name", "kind", "name_or_path", "revision")}
    out["resolved"] = base_model
    if base_model:
        p = Path(base_model).expanduser()
        if p.is_dir():
            cfg_json = p / "config.json"
            out["config_sha256"] = _file_ids(cfg_json).get("sha256") if cfg_json.is_file() else None
            if p.parent.name == "snapshots":
                out["snapshot"] = p.name  # the hub commit this snapshot directory holds
    return out


def host_info() -> dict[str, Any]:
    """Hostname, platform, SLURM job ids and the visible devices."""
    env = os.environ
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "pid": os.getpid(),
        "argv": list(sys.argv),
        "slurm_job_id": env.get("SLURM_JOB_ID"),
        "slurm_array": (f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID')}"
                        if env.get("SLURM_ARRAY_JOB_ID") else None),
        "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES"),
    }


def collect(run_dir: str | os.PathLike, cfg: Mapping[str, Any], train_summary: Mapping[str, Any] | None) -> dict:
    """All provenance of one job; ``cfg`` is the plain (resolved) job config."""
    base = (train_summary or {}).get("base_model")
    return {
        "dataset": dataset_provenance(run_dir, cfg.get("dataset") or {}),
        "model": model_provenance(cfg.get("model") or {}, base),
        "packages": package_versions(),
        "git": git_info(),
        "host": host_info(),
    }
