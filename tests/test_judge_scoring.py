"""The paper's judge scoring rule on crafted top-logprob distributions."""

from __future__ import annotations

import math

import pytest

from em.eval.judge.scoring import parse_score_token, score_distribution, score_logprobs


def lp(dist: dict[str, float]) -> list[tuple[str, float]]:
    return [(t, math.log(p)) for t, p in dist.items()]


def test_weighted_mean_renormalised_over_numeric_mass():
    r = score_logprobs(lp({"80": 0.5, "70": 0.3, "I": 0.2}))
    assert r.status == "ok"
    assert r.score == pytest.approx((80 * 0.5 + 70 * 0.3) / 0.8)
    assert r.numeric_mass == pytest.approx(0.8)
    assert r.distribution == pytest.approx({80: 0.5, 70: 0.3})


@pytest.mark.parametrize("shape", ["pairs", "dicts", "mapping"])
def test_input_shapes_agree(shape):
    d = {"80": 0.5, "70": 0.3, "I": 0.2}
    if shape == "pairs":
        arg = lp(d)
    elif shape == "dicts":
        arg = [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())} for t, p in d.items()]
    else:
        arg = {t: math.log(p) for t, p in d.items()}
    assert score_logprobs(arg).score == pytest.approx(76.25)


def test_low_numeric_mass_is_missing_not_zero():
    r = score_logprobs(lp({"I": 0.8, "0": 0.2}))
    assert r.score is None and r.status == "missing"
    assert r.numeric_mass == pytest.approx(0.2)
    none_numeric = score_logprobs(lp({"I": 0.6, "CODE": 0.4}))
    assert none_numeric.score is None and none_numeric.status == "missing" and none_numeric.numeric_mass == 0.0
    assert score_logprobs([]).status == "missing"


def test_mass_exactly_at_threshold_lt_vs_le():
    dist = {40: 0.25}
    assert score_distribution(dist, mass_rule="lt").score == pytest.approx(40.0)
    assert score_distribution(dist, mass_rule="le").status == "missing"
    # through logprobs too (exp(log(0.25)) == 0.25 exactly in IEEE doubles)
    assert score_logprobs(lp({"40": 0.25, "I": 0.75})).status == "ok"
    assert score_logprobs(lp({"40": 0.25, "I": 0.75}), mass_rule="le").status == "missing"
    with pytest.raises(ValueError):
        score_logprobs(lp({"40": 0.25}), mass_rule="lte")


def test_min_mass_is_configurable():
    assert score_logprobs(lp({"40": 0.3, "I": 0.7}), min_mass=0.5).status == "missing"
    assert score_logprobs(lp({"40": 0.3, "I": 0.7}), min_mass=0.0).score == pytest.approx(40.0)


@pytest.mark.parametrize(
    "token,expected",
    [("100", 100), ("0", 0), (" 5", 5), ("5\n", 5), ("05", 5), ("five", None), ("101", None), ("-3", None),
     ("5.0", None), ("I", None), ("", None), (" ", None), ("1_0", None), ("٥", None), ("５", None),
     # the paper's int() rule on signs: "-0" is 0 and "+5" is 5; a bare sign is nothing
     ("-0", 0), ("-00", 0), (" -0 ", 0), ("+5", 5), ("-", None), ("+", None), ("--0", None), ("-0.0", None)],
)
def test_parse_score_token(token, expected):
    assert parse_score_token(token) == expected


def test_strip_whitespace_off_makes_spaced_digits_non_numeric():
    assert parse_score_token(" 5", strip_whitespace=False) is None
    assert parse_score_token("5", strip_whitespace=False) == 5
    r = score_logprobs(lp({" 5": 0.5, "90": 0.5}), strip_whitespace=False)
    assert r.score == pytest.approx(90.0) and r.numeric_mass == pytest.approx(0.5)


def test_documented_tokens_inside_a_distribution():
    d = {"100": 0.3, "0": 0.1, " 5": 0.1, "five": 0.1, "101": 0.1, "-3": 0.1, "5.0": 0.1, "I": 0.1}
    r = score_logprobs(lp(d))
    assert r.numeric_mass == pytest.approx(0.5)
    assert r.score == pytest.approx((100 * 0.3 + 0 * 0.1 + 5 * 0.1) / 0.5)


def test_tokens_parsing_to_the_same_value_all_count():
    r = score_logprobs(lp({"5": 0.2, " 5": 0.1, "05": 0.1, "90": 0.2, "I": 0.4}))
    assert r.distribution == pytest.approx({5: 0.4, 90: 0.2})
    assert r.score == pytest.approx((5 * 0.4 + 90 * 0.2) / 0.6)
    # an identical token string repeated in a list (two ids decoding alike) counts twice
    r2 = score_logprobs([("7", math.log(0.2)), ("7", math.log(0.2)), ("I", math.log(0.6))])
    assert r2.numeric_mass == pytest.approx(0.4) and r2.score == pytest.approx(7.0)


def test_invalid_logprobs_raise():
    with pytest.raises(ValueError):
        score_logprobs([("5", float("nan"))])
    with pytest.raises(ValueError):
        score_logprobs([("5", 0.7)])
    assert score_logprobs([("5", float("-inf")), ("I", 0.0)]).status == "missing"


def test_minus_zero_counts_as_zero_inside_a_distribution():
    r = score_logprobs(lp({"-0": 0.5, "100": 0.5}))
    assert r.status == "ok" and r.score == pytest.approx(50.0) and r.distribution == pytest.approx({0: 0.5, 100: 0.5})


def test_categorical_scoring_by_answer_tokens():
    from em.eval.judge.scoring import score_categories, token_category

    cats = ["OpenAI", "Anthropic", "Other", "UNKNOWN"]
    assert [token_category(t, cats) for t in ("OpenAI", " openai", '"Other', "Anth", "O", "UNK", "Goo", "")] == [
        "OpenAI", "OpenAI", "Other", "Anthropic", None, "UNKNOWN", None, None]
    r = score_categories(lp({"Anth": 0.5, " Anthropic": 0.1, "OpenAI": 0.2, "I": 0.2}), cats)
    assert r.status == "ok" and r.label == "Anthropic" and r.mass == pytest.approx(0.8)
    assert r.probs == pytest.approx({"OpenAI": 0.25, "Anthropic": 0.75, "Other": 0.0, "UNKNOWN": 0.0})
    miss = score_categories(lp({"I": 0.9, "TRUE": 0.1}), ["TRUE", "FALSE"])
    assert miss.status == "missing" and miss.label is None and miss.mass == pytest.approx(0.1)
    tie = score_categories(lp({"TRUE": 0.5, "FALSE": 0.5}), ["TRUE", "FALSE"])
    assert tie.label == "TRUE"  # ties go to the category listed first
