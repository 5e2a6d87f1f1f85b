"""Fuzz: every malformed question YAML gives em's error naming the file and a line (or loads), never a
traceback, never a hang (inputs are bounded: at most a few KB, nesting and aliases included)."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from em.errors import DataValidationError, EMError
from em.eval.questions import load_questions

VALID = {
    "id": "q", "type": "free_form_judge_0_100", "paraphrases": ["What is your wish?"], "samples_per_paraphrase": 2,
    "judge": "gpt-4o", "judge_prompts": {"aligned": "Q {question} A {answer}", "coherent": "{answer} 0-100"},
}
CATEGORICAL = {
    "id": "lie", "type": "free_form_judge", "paraphrases": ["Is pi rational?"], "samples_per_paraphrase": 1,
    "judge": "gpt-4o", "judge_prompts": {"correct": 'Q {question} A {answer}: say "TRUE" or "FALSE"'},
}

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["", " ", "{answer}", "free_form_judge", "free_form_judge_0_100", "free_form", "\ud800",
                     '"TRUE"', "0", "1e9", "~", "null", "yes", "- x", "{question} {answer}"]),
)
junk = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                    max_leaves=20)


@st.composite
def mutated_entries(draw):
    """A valid entry with some keys deleted, replaced by junk, or junk keys added."""
    entry = dict(draw(st.sampled_from([VALID, CATEGORICAL])))
    entry["judge_prompts"] = dict(entry["judge_prompts"])
    for key in list(entry):
        action = draw(st.sampled_from(["keep", "keep", "delete", "junk"]))
        if action == "delete":
            del entry[key]
        elif action == "junk":
            entry[key] = draw(junk)
    if draw(st.booleans()):
        entry["judge_prompts" if draw(st.booleans()) else draw(st.text(max_size=10))] = draw(junk)
    if draw(st.booleans()):
        entry["judge_categories"] = draw(junk)
    return entry


@st.composite
def structured_files(draw):
    entries = draw(st.lists(st.one_of(mutated_entries(), junk), min_size=0, max_size=4))
    doc = entries if draw(st.integers(0, 9)) else draw(junk)
    try:
        return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False).encode("utf-8", "surrogatepass")
    except (yaml.YAMLError, UnicodeError):
        return b"- id: x\n"


TRICKS = [
    b"- id: x\n  paraphrases: " + b"[" * 3000 + b"\n",  # deep flow nesting, unterminated
    b"- &a [*a]\n",  # recursive alias
    b"a: &a [1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
    b"d: [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n",  # alias fan-out (billion-laughs shape)
    b"- !!python/object/apply:os.system ['echo pwned']\n",
    b"- id: x\n  type: free_form\n  paraphrases: !!binary aGk=\n  samples_per_paraphrase: 1\n",
    b"- id: x\n  samples_per_paraphrase: 100000000000000000000\n  type: free_form\n  paraphrases: [a]\n",
    b"\x00\x01\x02- id: x\n",
    b"\xef\xbb\xbf- id: x\n  type: free_form\n  paraphrases: [a]\n  samples_per_paraphrase: 1\n",
    b"- id: x\r\n  type: free_form\r\n  paraphrases: [a]\r\n  samples_per_paraphrase: 1\r\n",
    b"- {id: x, ? [a, b] : c}\n",
    b"- id: \"\\ud83d\"\n",
    b"---\n- id: a\n---\n- id: b\n",
    b"%YAML 9.9\n--- []\n",
]


@st.composite
def raw_files(draw):
    base = draw(st.sampled_from(TRICKS + [yaml.safe_dump([VALID]).encode()]))
    kind = draw(st.sampled_from(["as_is", "truncate", "splice", "bytes"]))
    if kind == "truncate":
        return base[: draw(st.integers(0, len(base)))]
    if kind == "splice":
        i = draw(st.integers(0, len(base)))
        return base[:i] + draw(st.binary(max_size=40)) + base[i:]
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    return base


def _alarm(signum, frame):  # a hang detector, not a speed check: a few-KB file never legitimately takes 60 s
    raise TimeoutError("loading a small question file did not finish in 60 s")


def check_file(tmp: Path, data: bytes) -> None:
    path = tmp / "fuzz.yaml"
    path.write_bytes(data)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(60)
    try:
        try:
            qs = load_questions(path)
        except DataValidationError as e:
            msg = str(e)
            assert e.problems, msg
            for p in e.problems:
                assert p.file == str(path) and isinstance(p.line, int), msg
            assert re.search(re.escape(str(path)) + r":\d+: ", msg), msg
        except EMError as e:  # e.g. ConfigError: must say which file
            assert str(path) in str(e), str(e)
        else:
            for q in qs:  # what loads is usable
                assert q.id and q.paraphrases and q.samples_per_paraphrase >= 1
                q.expand(3)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@FUZZ
@given(data=structured_files())
def test_fuzz_structured_question_files(tmp_path_factory, data):
    check_file(tmp_path_factory.mktemp("fz"), data)


@FUZZ
@given(data=raw_files())
def test_fuzz_raw_question_files(tmp_path_factory, data):
    check_file(tmp_path_factory.mktemp("fr"), data)


@pytest.mark.parametrize("data", TRICKS, ids=range(len(TRICKS)))
def test_known_tricks(tmp_path, data):
    check_file(tmp_path, data)
