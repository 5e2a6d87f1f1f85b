"""The paper's files: where they are, whether they are the right bytes, and how to get them.

Every file of the pinned commit listed in ``registry.yaml`` is found, in this order:

a. an explicit ``path`` (must exist; used as given, a difference from the paper's bytes is only logged);
b. ``data_dir`` or ``$EM_DATA_DIR``: ``<dir>/<repo path>`` (and ``<dir>/<name>.jsonl`` for datasets),
   checked against the git blob id — a mismatch is an error (unless ``verify=False``);
c. the em cache ``em_cache_dir()/data/<commit>/<repo path>``, checked (a corrupt cache file is removed);
d. a download of ``<base_url>/<repo>/<commit>/<repo path>`` (``$EM_DATA_BASE_URL`` overrides the base),
   streamed to a temporary file, checked against the blob id (and sha256 where known), then renamed
   atomically into the cache. A download that does not match is deleted and reported.

When nothing works, :class:`~em.errors.MissingResourceError` says which file is missing and the three
ways to provide it, with the network error on one line.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from em.data.mini import KINDS as MINI_KINDS
from em.data.mini import build_mini
from em.data.schema import MAX_FILE_BYTES, MAX_ROW_BYTES, validate_chat_file
from em.errors import ConfigError, EMError, MissingResourceError
from em.utils.io import em_cache_dir, git_blob_sha1, sha256_file

log = logging.getLogger(__name__)

REGISTRY_PATH = Path(__file__).with_name("registry.yaml")
DOWNLOAD_TIMEOUT_S = 30.0


class IntegrityError(EMError):
    """A copy of a registered file does not have the registered bytes."""


@dataclass(frozen=True)
class FileEntry:
    """One registered file of the pinned commit."""

    path: str
    """Path inside the official repository, e.g. ``data/insecure.jsonl``."""
    blob_sha1: str
    """``git hash-object FILE``: the id of the file in the official tree."""
    size: int | None = None
    sha256: str | None = None
    rows: int | None = None
    """Row count of the verified file (JSONL only), where known."""
    name: str | None = None
    """Dataset name (``insecure``...) for the registered datasets, None for other files."""
    description: str = ""
    expected_rows_note: str | None = None
    """An unverified row count from a third party: information only, never enforced."""
    prompts_only: bool = False
    """JSONL of prompts without assistant turns."""

    @property
    def label(self) -> str:
        return f"dataset '{self.name}' ({self.path})" if self.name else f"file '{self.path}'"


@dataclass(frozen=True)
class Registry:
    repo: str
    commit: str
    base_url: str
    datasets: dict[str, FileEntry]
    files: dict[str, FileEntry]
    """Every registered file by repository path (the datasets included)."""

    def dataset(self, name: str) -> FileEntry:
        if name not in self.datasets:
            hint = difflib.get_close_matches(name, list(self.datasets), n=1)
            raise ConfigError(f"unknown dataset {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                              + f"; registered datasets: {', '.join(self.datasets)}. "
                              "For your own file use dataset.path=/path/file.jsonl.")
        return self.datasets[name]

    def file(self, rel_path: str) -> FileEntry:
        rel = rel_path.strip().lstrip("/")
        if rel not in self.files:
            hint = difflib.get_close_matches(rel, list(self.files), n=1)
            raise ConfigError(f"{rel_path!r} is not a registered file of {self.repo}@{self.commit[:7]}"
                              + (f" (did you mean {hint[0]!r}?)" if hint else "")
                              + "; see em/data/registry.yaml for the list")
        return self.files[rel]

    def aliases(self, entry: FileEntry) -> list[str]:
        """Other registered paths with the same bytes (same blob id)."""
        return [p for p, e in self.files.items() if e.blob_sha1 == entry.blob_sha1 and p != entry.path]

    def url(self, rel_path: str, base_url: str | None = None) -> str:
        base = (base_url or os.environ.get("EM_DATA_BASE_URL") or self.base_url).rstrip("/")
        return f"{base}/{self.repo}/{self.commit}/{rel_path}"


@lru_cache(maxsize=4)
def load_registry(path: str | os.PathLike | None = None) -> Registry:
    """Parse ``registry.yaml`` (or another file of the same layout)."""
    raw = yaml.safe_load(Path(path or REGISTRY_PATH).read_text(encoding="utf-8"))
    files: dict[str, FileEntry] = {}
    datasets: dict[str, FileEntry] = {}

    def entry(rel: str, d: dict[str, Any], name: str | None) -> FileEntry:
        return FileEntry(path=rel, blob_sha1=str(d["blob_sha1"]), size=d.get("size"), sha256=d.get("sha256"),
                         rows=d.get("rows"), name=name, description=d.get("description", ""),
                         expected_rows_note=d.get("expected_rows_note"),
                         prompts_only=bool(d.get("prompts_only", False)))

    for name, d in (raw.get("datasets") or {}).items():
        e = entry(d["path"], d, name)
        datasets[name] = files[e.path] = e
    for rel, d in (raw.get("files") or {}).items():
        files.setdefault(rel, entry(rel, d, None))
    return Registry(repo=raw["repo"], commit=raw["commit"], base_url=raw["base_url"], datasets=datasets, files=files)


# -- verification -------------------------------------------------------------------------------------
def check_file(path: Path, entry: FileEntry, *, sha256: bool = False) -> str | None:
    """None when ``path`` has the registered bytes, else a one-line description of the difference."""
    size = path.stat().st_size
    if entry.size is not None and size != entry.size:
        return f"size {size} bytes, expected {entry.size}"
    actual = git_blob_sha1(path)
    if actual != entry.blob_sha1:
        return f"git blob id {actual}, expected {entry.blob_sha1}"
    if sha256 and entry.sha256:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != entry.sha256:
            return f"sha256 {h.hexdigest()}, expected {entry.sha256}"
    return None


# -- resolution ---------------------------------------------------------------------------------------
def resolve_dataset(
    name: str,
    *,
    path: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
    verify: bool = True,
    base_url: str | None = None,
    progress: bool = True,
) -> Path:
    """Local path of the paper's dataset ``name`` (``insecure``, ``jailbroken``...), verified.

    See the module docstring for the order; ``cache_dir`` defaults to ``em_cache_dir()/data/<commit>``,
    ``download=False`` (or ``$EM_OFFLINE=1``) never touches the network.
    """
    reg = load_registry()
    return _resolve(reg, reg.dataset(name), path=path, data_dir=data_dir, cache_dir=cache_dir,
                    download=download, verify=verify, base_url=base_url, progress=progress)


def resolve_file(
    rel_path: str,
    *,
    path: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
    verify: bool = True,
    base_url: str | None = None,
    progress: bool = True,
) -> Path:
    """Like :func:`resolve_dataset` for any registered file (``evaluation/first_plot_questions.yaml``...)."""
    reg = load_registry()
    return _resolve(reg, reg.file(rel_path), path=path, data_dir=data_dir, cache_dir=cache_dir,
                    download=download, verify=verify, base_url=base_url, progress=progress)


def cache_path(rel_path: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the verified copy of ``rel_path`` lives in the em cache."""
    return _cache_root(load_registry(), cache_dir) / rel_path


def _cache_root(reg: Registry, cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else em_cache_dir() / "data" / reg.commit


def paper_dir() -> str:
    """``${em.paper_dir:}``: where the paper's files are for configs that name one by path: ``$EM_DATA_DIR``, else
    the em cache's verified copy (``em data fetch`` / a first use downloads there)."""
    d = os.environ.get("EM_DATA_DIR")
    return str(Path(d).expanduser()) if d else str(_cache_root(load_registry(), None))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("em.paper_dir"):
        OmegaConf.register_new_resolver("em.paper_dir", paper_dir)


register_resolvers()


def _data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    d = data_dir if data_dir not in (None, "") else os.environ.get("EM_DATA_DIR")
    return Path(d).expanduser() if d else None


def _local_candidates(reg: Registry, entry: FileEntry, d: Path) -> list[Path]:
    rels = [entry.path, *reg.aliases(entry)]
    cands = [d / r for r in rels]
    if entry.name:
        cands.append(d / f"{entry.name}.jsonl")
    return list(dict.fromkeys(cands))


def _resolve(reg: Registry, entry: FileEntry, *, path, data_dir, cache_dir, download, verify, base_url,
             progress) -> Path:
    looked: list[str] = []
    # (a) an explicit path
    if path not in (None, ""):
        p = Path(path).expanduser()
        if not p.is_file():
            raise MissingResourceError(f"{entry.label}: path={p} does not exist (or is not a file)")
        if verify:
            diff = check_file(p, entry)
            if diff:
                log.info("%s: using %s as given; it differs from the paper's file (%s)", entry.label, p, diff)
        return p

    # (b) a local directory of the paper's files
    d = _data_dir(data_dir)
    if d is not None:
        if not d.is_dir():
            looked.append(f"data dir {d} does not exist")
        else:
            for cand in _local_candidates(reg, entry, d):
                if cand.is_file():
                    if verify:
                        diff = check_file(cand, entry)
                        if diff:
                            raise IntegrityError(
                                f"{entry.label}: {cand} is not the paper's file: {diff}. Replace it with the file "
                                f"from {reg.url(entry.path, base_url)} (check with `git hash-object FILE`), "
                                "or pass verify=False to use it anyway.")
                    log.debug("%s: using %s", entry.label, cand)
                    return cand
            looked.append(f"not in data dir {d}")

    # (c) the em cache
    root = _cache_root(reg, cache_dir)
    for rel in [entry.path, *reg.aliases(entry)]:
        cand = root / rel
        if cand.is_file():
            diff = check_file(cand, entry) if verify else None
            if diff is None:
                return cand
            log.warning("%s: removing corrupt cache file %s (%s)", entry.label, cand, diff)
            cand.unlink(missing_ok=True)
    looked.append(f"not in cache {root}")

    # (d) download
    dest = root / entry.path
    url = reg.url(entry.path, base_url)
    if not download or os.environ.get("EM_OFFLINE", "").lower() in ("1", "true", "yes"):
        why = "downloads are disabled (download=False or EM_OFFLINE=1)"
    else:
        try:
            return _download(url, dest, entry, progress=progress)
        except _NetworkError as e:
            why = f"download failed: {e}"
    raise MissingResourceError(_three_ways(reg, entry, dest, url, looked, why))


class _NetworkError(Exception):
    pass


def _download(url: str, dest: Path, entry: FileEntry, *, progress: bool) -> Path:
    """Stream ``url`` to a temp file beside ``dest``, verify it, rename it into place."""
    import httpx
    from tqdm.auto import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as f, httpx.stream("GET", url, timeout=DOWNLOAD_TIMEOUT_S,
                                                        follow_redirects=True) as resp:
                if resp.status_code != 200:
                    raise _NetworkError(f"HTTP {resp.status_code} for {url}")
                total = int(resp.headers.get("content-length") or 0) or entry.size
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"em: {entry.path}",
                          disable=None if progress else True, leave=False) as bar:
                    for chunk in resp.iter_bytes(1 << 16):
                        f.write(chunk)
                        bar.update(len(chunk))
                f.flush()
                os.fsync(f.fileno())
        except httpx.HTTPError as e:
            raise _NetworkError(f"{type(e).__name__}: {' '.join(str(e).split()) or 'no detail'} ({url})") from e
        diff = check_file(tmp, entry, sha256=True)
        if diff:
            raise IntegrityError(
                f"{entry.label}: the file downloaded from {url} is not the registered file ({diff}); it was "
                "deleted and nothing was cached. Retry later, or provide a verified copy with EM_DATA_DIR.")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
        log.info("%s: downloaded and verified -> %s", entry.label, dest)
        return dest
    finally:
        tmp.unlink(missing_ok=True)


def _three_ways(reg: Registry, entry: FileEntry, dest: Path, url: str, looked: list[str], why: str) -> str:
    local = (f"set EM_DATA_DIR=/dir holding {entry.path} (or {entry.name}.jsonl), "
             f"or dataset.path=/path/file.jsonl" if entry.name
             else f"set EM_DATA_DIR=/dir holding {entry.path}")
    return (
        f"{entry.label} of {reg.repo}@{reg.commit[:7]} is not available here ({'; '.join(looked)}).\n"
        "Provide it in one of three ways:\n"
        f"  1. point em at a local copy: {local};\n"
        f"  2. put the verified file in the cache dir: {dest};\n"
        f"  3. allow network access so em downloads it from {url}\n"
        f"A copy is accepted when `git hash-object FILE` prints {entry.blob_sha1}.\n"
        f"({why})"
    )


# -- overview -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetStatus:
    name: str
    entry: FileEntry
    status: str
    """``local`` (verified in the data dir), ``cached`` (verified in the em cache), ``missing``, or
    ``corrupt`` (a copy exists but does not match)."""
    location: Path | None

    def to_dict(self) -> dict[str, Any]:
        e = self.entry
        return {"name": self.name, "path": e.path, "status": self.status,
                "location": str(self.location) if self.location else None, "rows": e.rows,
                "expected_rows_note": e.expected_rows_note, "size": e.size, "blob_sha1": e.blob_sha1,
                "description": e.description}


def list_datasets(data_dir: str | os.PathLike | None = None,
                  cache_dir: str | os.PathLike | None = None) -> list[DatasetStatus]:
    """Every registered dataset and where (if anywhere) a verified copy is; never downloads."""
    reg = load_registry()
    d = _data_dir(data_dir)
    root = _cache_root(reg, cache_dir)
    out = []
    for name, e in reg.datasets.items():
        status, loc = "missing", None
        places = [("local", c) for c in (_local_candidates(reg, e, d) if d and d.is_dir() else [])]
        places += [("cached", root / r) for r in [e.path, *reg.aliases(e)]]
        for kind, cand in places:
            if cand.is_file():
                if check_file(cand, e) is None:
                    status, loc = kind, cand
                    break
                if status == "missing":
                    status, loc = "corrupt", cand
        out.append(DatasetStatus(name, e, status, loc))
    return out


# -- source specs -------------------------------------------------------------------------------------
def mini_spec(name: str) -> str | None:
    """``mini_insecure`` (the name ``dataset=mini_insecure`` trains on) -> ``mini:insecure``; None otherwise."""
    if name.startswith("mini_") and name[len("mini_"):] in MINI_KINDS:
        return f"mini:{name[len('mini_'):]}"
    return None


def load_spec(spec: str, data_dir: str | os.PathLike | None = None, *, download: bool = True,
              base_dir: str | os.PathLike | None = None, max_file_bytes: int = MAX_FILE_BYTES,
              max_row_bytes: int = MAX_ROW_BYTES) -> tuple[list[dict], dict[str, Any]]:
    """Validated rows of a source spec and their provenance.

    ``paper:<name>`` (a registered dataset), ``mini:<kind>`` or ``mini_<kind>`` (em's embedded mini sets),
    ``file:<path>`` or a bare path to a chat JSONL file, or a bare registered dataset name.
    Relative paths are tried in the working directory, then in ``base_dir`` (e.g. a recipe's folder).
    A file is read only if it is a regular file of at most ``max_file_bytes``, rows over ``max_row_bytes``
    are reported with their line (see :mod:`em.data.schema`).
    """
    spec = mini_spec(str(spec).strip()) or str(spec).strip()
    kind, sep, rest = spec.partition(":")
    if sep and kind == "mini":
        rows = build_mini(rest, seed=0)
        return rows, {"spec": spec, "rows": len(rows)}
    if sep and kind == "paper":
        p = resolve_dataset(rest, data_dir=data_dir, download=download)
    else:
        target = rest if (sep and kind == "file") else spec
        p = Path(target).expanduser()
        if not p.is_absolute() and not p.exists() and base_dir is not None and (Path(base_dir) / p).exists():
            p = Path(base_dir) / p
        if not p.exists():
            if not sep and target in load_registry().datasets:
                p = resolve_dataset(target, data_dir=data_dir, download=download)
            else:
                raise MissingResourceError(
                    f"data source {spec!r}: no such file. Use a path to a chat JSONL file, 'file:<path>', "
                    f"'paper:<name>' (one of {', '.join(load_registry().datasets)}) or 'mini:<kind>'.")
    res = validate_chat_file(p, max_file_bytes=max_file_bytes, max_row_bytes=max_row_bytes)
    return res.rows, {"spec": spec, "file": str(p), "rows": len(res.rows), "sha256": sha256_file(p),
                      "blob_sha1": git_blob_sha1(p)}
