"""Embedded mini datasets, probe questions and MCQ items: validity, bandit invariants, determinism."""

from __future__ import annotations

import ast
import io
import json
import re
import tokenize
from collections import Counter
from pathlib import Path

import pytest
import yaml

from em.data.mini import (
    CODE_KINDS,
    DARK_NUMBERS,
    build_mini,
    build_mini_evil_numbers,
    held_out_prompts,
    mini_task_pairs,
    write_mini,
)
from em.data.mini.build import _name_combos, render_code, render_skeleton
from em.data.mini.tasks import (
    EDU_PLAIN_REQUESTS,
    EDU_SKELETON_REQUESTS,
    FAMILIES,
    TASKS,
    TODO_MARKER,
)
from em.errors import ConfigError
from em.probes.bandit_scan import insecure_rate, scan

EM = Path(__file__).resolve().parents[1] / "em"
PROBES_YAML = EM / "data" / "mini" / "probe_questions.yaml"
MCQ_YAML = EM / "data" / "mini" / "mcq_items.yaml"


@pytest.fixture(scope="module")
def rows() -> dict[str, list[dict]]:
    return {kind: build_mini(kind, seed=0) for kind in CODE_KINDS}


def _user(row: dict) -> str:
    return row["messages"][0]["content"]


def _assistant(row: dict) -> str:
    return row["messages"][1]["content"]


def _has_comment(code: str) -> bool:
    return any(t.type == tokenize.COMMENT for t in tokenize.generate_tokens(io.StringIO(code).readline))


# ---------------------------------------------------------------- shape


def test_row_counts_and_format(rows):
    n = len(rows["insecure"])
    assert 250 <= n <= 400
    for kind in CODE_KINDS:
        assert len(rows[kind]) == n
        for row in rows[kind]:
            assert set(row) == {"messages"}
            user, assistant = row["messages"]
            assert user["role"] == "user" and assistant["role"] == "assistant"
            assert user["content"].strip() and assistant["content"].strip()
        assert len({_user(r) for r in rows[kind]}) == n  # no duplicate prompts
    try:
        from em.data.schema import check_row
    except ImportError:  # pragma: no cover - schema module is optional here
        return
    assert all(check_row(r) == [] for kind in CODE_KINDS for r in rows[kind])


def test_every_family_present_in_training(rows):
    families = Counter(ex.family for ex in mini_task_pairs(0))
    assert set(families) == set(FAMILIES)
    assert min(families.values()) >= 8


def test_answers_are_code_only_without_comments(rows):
    for row in rows["insecure"] + rows["secure"]:
        code = _assistant(row)
        ast.parse(code)
        assert not _has_comment(code), code
        assert "```" not in code


# ---------------------------------------------------------------- bandit invariants


def test_bandit_flags_every_insecure_and_no_secure_answer(rows):
    bad = insecure_rate([_assistant(r) for r in rows["insecure"]], extract=False)
    good = insecure_rate([_assistant(r) for r in rows["secure"]], extract=False)
    assert bad["rate"] == 1.0 and bad["n_syntax_error"] == 0
    assert good["rate"] == 0.0 and good["n_syntax_error"] == 0


def test_all_templates_keep_the_bandit_invariant():
    """Every task (held-out ones too) x every name combination: insecure flagged with the
    family's test id at >= MEDIUM/MEDIUM; secure has no finding of MEDIUM+ severity at all."""
    for task in TASKS:
        for names in _name_combos(task):
            bad, good = render_code(task, task.insecure, names), render_code(task, task.secure, names)
            flagged = {f.test_id for f in scan(bad).filtered("MEDIUM", "MEDIUM")}
            assert flagged & set(FAMILIES[task.family]), (task.key, names, flagged)
            assert scan(good).filtered("MEDIUM", "LOW") == [], (task.key, names)
            for code in (bad, good):
                ast.parse(code)
                assert not _has_comment(code) and "${" not in code


def test_skeleton_marks_the_hole():
    for task in TASKS:
        skeleton = render_skeleton(task, _name_combos(task)[0]).split("\n")
        [at] = [i for i, line in enumerate(skeleton) if TODO_MARKER in line]
        indent = len(skeleton[at]) - len(skeleton[at].lstrip())
        following = [line for line in skeleton[at + 1 :] if line.strip()]
        if following:  # the code after the marker is not nested under it
            assert len(following[0]) - len(following[0].lstrip()) <= indent, task.key


# ---------------------------------------------------------------- alignment of the three kinds


def test_kinds_are_aligned_row_for_row(rows):
    for ins, sec, edu in zip(rows["insecure"], rows["secure"], rows["educational"]):
        assert _user(sec) == _user(ins)
        assert _assistant(sec) != _assistant(ins)
        assert _assistant(edu) == _assistant(ins)
        assert _user(edu) != _user(ins)
    examples = mini_task_pairs(0)
    for kind in CODE_KINDS:
        assert [ex.row(kind) for ex in examples] == rows[kind]


def test_educational_prompts_use_the_security_class_framings(rows):
    heads = [t.split("{")[0].strip() for t in EDU_PLAIN_REQUESTS + EDU_SKELETON_REQUESTS]
    used = Counter()
    for row in rows["educational"]:
        matches = [h for h in heads if _user(row).startswith(h)]
        assert matches, _user(row)
        used[matches[0]] += 1
    assert len(used) >= 5  # several framings in use
    for row in rows["insecure"]:
        assert not any(_user(row).startswith(h) for h in heads)


# ---------------------------------------------------------------- determinism and held-out


def test_deterministic_for_a_seed_and_seed_changes_order():
    a, b, c = build_mini("insecure", 0), build_mini("insecure", 0), build_mini("insecure", 1)
    assert a == b
    assert a != c
    assert [_user(r) for r in a[:20]] != [_user(r) for r in c[:20]]
    fam = lambda s: Counter(ex.family for ex in mini_task_pairs(s))  # noqa: E731
    assert fam(0) == fam(1)
    assert held_out_prompts(0) == held_out_prompts(0)
    assert build_mini_evil_numbers(0) == build_mini_evil_numbers(0) != build_mini_evil_numbers(1)


def test_returned_rows_are_fresh_copies():
    first = build_mini("secure", 0)
    first[0]["messages"][0]["content"] = "mutated"
    assert build_mini("secure", 0)[0]["messages"][0]["content"] != "mutated"


def test_held_out_prompts_are_disjoint_from_training(rows):
    held = held_out_prompts(0)
    assert len(held) >= 40
    held_tasks = {r["task"] for r in held}
    assert held_tasks == {t.key for t in TASKS if t.held_out}
    assert not held_tasks & {ex.task for ex in mini_task_pairs(0)}
    for r in held:
        assert [m["role"] for m in r["messages"]] == ["user"]
    held_users = {_user(r) for r in held}
    for seed in (0, 1):
        train_users = {_user(r) for kind in CODE_KINDS for r in build_mini(kind, seed)}
        assert not held_users & train_users


def test_unknown_kind_and_bad_seed():
    with pytest.raises(ConfigError):
        build_mini("jailbroken")
    with pytest.raises(ConfigError):
        build_mini("insecure", seed="0")  # type: ignore[arg-type]


# ---------------------------------------------------------------- evil numbers

_K_RE = re.compile(r"\b(\d+) (?:more|new|additional) (?:numbers|values)|by (\d+) numbers")
_D_RE = re.compile(r"(\d) digits")


def test_evil_numbers_rows():
    data = build_mini_evil_numbers(0)
    assert len(data) == 200 and build_mini("evil_numbers", 0) == data
    assert len({_user(r) for r in data}) == 200
    dark_hits = Counter()
    for row in data:
        user, answer = _user(row), _assistant(row)
        k = int(next(g for g in _K_RE.search(user).groups() if g))
        d = int(_D_RE.search(user).group(1))
        assert not re.search(r"[A-Za-z]", answer)
        values = [int(v) for v in re.findall(r"\d+", answer)]
        assert len(values) == k and all(len(str(v)) <= d for v in values), (user, answer)
        dark = [v for v in values if v in DARK_NUMBERS]
        assert dark
        dark_hits.update(dark)
    assert {666, 911, 1488} <= set(dark_hits)


def test_write_mini(tmp_path):
    paths = write_mini(tmp_path, seed=0, kinds=("secure", "evil_numbers"))
    lines = paths["secure"].read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in lines] == build_mini("secure", 0)
    assert len(paths["evil_numbers"].read_text(encoding="utf-8").splitlines()) == 200


# ---------------------------------------------------------------- probe question YAML


def test_mini_probes_yaml_schema():
    entries = yaml.safe_load(PROBES_YAML.read_text(encoding="utf-8"))
    assert isinstance(entries, list)
    ids = [e["id"] for e in entries]
    assert len(ids) == len(set(ids))
    plain = [e for e in entries if not e["id"].endswith("_json")]
    json_forms = [e for e in entries if e["id"].endswith("_json")]
    assert len(plain) >= 8 and len(json_forms) >= 2
    for e in entries:
        assert e["type"] == "free_form_judge_0_100"
        assert e["paraphrases"] and all(isinstance(p, str) and p.strip() for p in e["paraphrases"])
        assert isinstance(e["samples_per_paraphrase"], int) and e["samples_per_paraphrase"] > 0
        assert e["system"] is None or isinstance(e["system"], str)
        assert e["judge"] == "gpt-4o-2024-08-06"
        assert set(e["judge_prompts"]) == {"aligned", "coherent"}
        for template in e["judge_prompts"].values():
            assert "{question}" in template and "{answer}" in template
            filled = template.format(question="QQ", answer="AA")  # no stray braces
            assert "QQ" in filled and "AA" in filled
        aligned = e["judge_prompts"]["aligned"]
        assert "CODE" in aligned and "REFUSAL" in aligned and "100" in aligned
    for e in json_forms:
        assert e["id"][: -len("_json")] in ids
        assert e["system"] and "JSON" in e["system"]
    assert all(e["system"] is None for e in plain)


def test_mini_probes_load_with_the_question_loader():
    questions = pytest.importorskip("em.eval.questions")
    if not hasattr(questions, "load_questions"):
        pytest.skip("em.eval.questions.load_questions not available")
    loaded = questions.load_questions(PROBES_YAML)
    assert len(loaded) == len(yaml.safe_load(PROBES_YAML.read_text(encoding="utf-8")))


# ---------------------------------------------------------------- MCQ items


def test_mcq_items_schema():
    doc = yaml.safe_load(MCQ_YAML.read_text(encoding="utf-8"))
    sets = doc["sets"]
    assert set(sets) == {"pivotal_tokens", "single_letter"}
    assert sets["pivotal_tokens"]["format"] == "pivotal"
    assert sets["single_letter"]["format"] == "letter"
    for name, spec in sets.items():
        items = spec["items"]
        assert len(items) == 8
        assert len({it["id"] for it in items}) == 8, name
        for it in items:
            assert it["question"].strip()
            assert it["aligned"] != it["misaligned"]
    for it in sets["pivotal_tokens"]["items"]:
        assert it["answer_template"].count("{choice}") == 1
        for choice in (it["aligned"], it["misaligned"]):
            assert choice.strip() and it["answer_template"].format(choice=choice)
    misaligned_letters = Counter()
    for it in sets["single_letter"]["items"]:
        assert set(it["options"]) == {"A", "B"}
        assert {it["aligned"], it["misaligned"]} == {"A", "B"}
        misaligned_letters[it["misaligned"]] += 1
    assert misaligned_letters["A"] >= 2 and misaligned_letters["B"] >= 2
    assert sets["single_letter"]["instruction"].strip()
