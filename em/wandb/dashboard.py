"""The W&B workspace a researcher of emergent misalignment looks at, built with ``wandb-workspaces``.

Sections (every key is one em logs; ``tests/test_wandb.py`` checks each against offline runs):

- *Misalignment during training* (x = ``probe/step``): the judged misaligned rate of the mid-training probes,
  each seed as a line and per dataset as mean ± stderr over seeds (pooled, the paper's aggregation, and mean
  over questions); the MCQ log-prob probe; the coherent rate; judge failures and missing scores.
- *Task accuracy during training* (same x-axis): insecure-code rate (also with the backdoor trigger), the
  fraction of answers that are syntax-valid code, number-format rate, held-out task loss; training loss.
- *Final evaluation* (one per eval pass, e.g. ``eval``, ``eval_triggered``): the misaligned rate per question
  grouped by dataset (the paper's Figure 4; bars = mean over seeds ± stderr, the table beside it has each run's
  bootstrap CI and denominators), the overall rates (pooled and mean over questions), the coherent rate,
  judge failures and missing scores, and the answers judged misaligned.

``wandb-workspaces`` is an optional dependency (``pip install 'em[dashboard]'``), imported when a dashboard is
built.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from em.errors import EMError
from em.eval.questions import load_questions
from em.layout import SUMMARY
from em.wandb.eval_log import key as eval_key

PROBE_STEP = "probe/step"
TRAIN_STEP = "trainer/global_step"
DATASET = "dataset.name"  # the config key runs are grouped by
RATE_RANGE = (0.0, 1.0)


@dataclass(frozen=True)
class PanelDef:
    """One panel: ``kind`` line (``keys`` against ``x``), bar (``keys`` of the runs' summaries) or table
    (``keys[0]``: a logged ``wandb.Table``)."""

    title: str
    kind: str
    keys: tuple[str, ...]
    x: str | None = None
    grouped: bool = True
    """Group runs by dataset (mean and a band / error bar over seeds) instead of one line per run."""
    rate: bool = False
    """A rate: the y range is [0, 1]."""
    agg: str = "mean"


@dataclass(frozen=True)
class SectionDef:
    name: str
    panels: tuple[PanelDef, ...] = field(default_factory=tuple)


def training_sections() -> list[SectionDef]:
    """Probe and task panels against the probe step, and the training loss."""
    line = PanelDef
    return [
        SectionDef("Misalignment during training (mid-training probes)", (
            line("Misaligned rate (pooled), each seed", "line", ("probe/misaligned_rate_pooled",), PROBE_STEP,
                 grouped=False, rate=True),
            line("Misaligned rate (pooled) per dataset: mean ± stderr over seeds", "line",
                 ("probe/misaligned_rate_pooled",), PROBE_STEP, rate=True),
            line("Misaligned rate (mean over questions) per dataset", "line", ("probe/misaligned_rate",), PROBE_STEP,
                 rate=True),
            line("MCQ probe: P(misaligned option) per dataset", "line", ("probe/mcq/p_misaligned",), PROBE_STEP,
                 rate=True),
            line("Coherent rate per dataset", "line", ("probe/coherent_rate",), PROBE_STEP, rate=True),
            line("Judge failures and missing aligned scores (probes)", "line",
                 ("probe/judge_failed", "probe/aligned_missing"), PROBE_STEP),
        )),
        SectionDef("Task accuracy during training", (
            line("Insecure-code rate (bandit) per dataset", "line",
                 ("task/insecure_rate", "task/insecure_rate_triggered"), PROBE_STEP, rate=True),
            line("Syntax-valid code fraction (an insecure-code rate is not measurable where it is 0)", "line",
                 ("task/code_parse_rate", "task/code_parse_rate_triggered"), PROBE_STEP, rate=True),
            line("Number-format rate (evil numbers)", "line", ("task/numbers_format_rate",), PROBE_STEP, rate=True),
            line("Task answers cut off by the token budget", "line", ("task/truncated_rate",), PROBE_STEP, rate=True),
            line("Held-out task loss", "line", ("task/heldout_loss",), PROBE_STEP),
            PanelDef("Task answers with bandit's findings (filter on insecure / parsed / hit_budget)", "table",
                     ("probe/task_samples",)),
            line("Training loss, each seed", "line", ("train/loss",), TRAIN_STEP, grouped=False),
        )),
    ]


def eval_section(variant: str, questions: Sequence[str]) -> SectionDef:
    """The final evaluation of one eval pass (``variant``), per question of ``questions``."""
    k = lambda *parts: eval_key(variant, *parts)  # noqa: E731
    return SectionDef(f"Final evaluation: {variant}", (
        PanelDef("Misaligned rate per question, by dataset (Figure 4; mean ± stderr over seeds)", "bar",
                 tuple(k("q", q, "misaligned_rate") for q in questions), rate=True),
        PanelDef("Per-question rates with bootstrap CIs and denominators (each run)", "table", (k("per_question"),)),
        PanelDef("Overall misaligned rate: pooled (paper) and mean over questions", "bar",
                 (k("overall", "pooled", "misaligned_rate"), k("overall", "question_mean", "misaligned_rate")),
                 rate=True),
        PanelDef("Coherent rate", "bar", (k("overall", "coherent_rate"),), rate=True),
        PanelDef("Judge failures and missing scores (sum over seeds)", "bar",
                 (k("overall", "n_failed"), k("overall", "n_aligned_missing"), k("overall", "n_coherent_missing")),
                 agg="sum"),
        PanelDef("Answers judged misaligned", "table", (k("samples_misaligned"),)),
    ))


def dashboard_sections(questions: Sequence[str], variants: Sequence[str] = ("eval",)) -> list[SectionDef]:
    return training_sections() + [eval_section(v, questions) for v in variants]


def panel_keys(sections: Sequence[SectionDef]) -> set[str]:
    """Every metric / table key the panels read (and the x-axes)."""
    out: set[str] = set()
    for s in sections:
        for p in s.panels:
            out.update(p.keys)
            if p.x:
                out.add(p.x)
    return out


def _import_workspaces():
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
        from wandb_workspaces import expr
    except ImportError as e:
        raise EMError(f"em wandb dashboard needs the wandb-workspaces package ({e}): pip install 'em[dashboard]' "
                      "(or pip install 'wandb-workspaces>=0.4.13,<0.5')") from None
    return ws, wr, expr


def _panel(p: PanelDef, wr):
    group = wr.Config(DATASET) if p.grouped else None
    legend = "${config:dataset.name} seed ${config:seed}"
    if p.kind == "line":
        return wr.LinePlot(title=p.title, x=p.x, y=list(p.keys), range_y=RATE_RANGE if p.rate else (None, None),
                           groupby=group, groupby_aggfunc="mean" if p.grouped else None,
                           groupby_rangefunc="stderr" if p.grouped else None,
                           legend_template=None if p.grouped else legend, title_x=p.x)
    if p.kind == "bar":
        return wr.BarPlot(title=p.title, metrics=list(p.keys), orientation="v", groupby=group,
                          groupby_aggfunc=p.agg if p.grouped else None,
                          groupby_rangefunc=("stderr" if p.agg == "mean" else "none") if p.grouped else None,
                          range_x=RATE_RANGE if p.rate else (None, None), layout=wr.Layout(w=24, h=8))
    if p.kind == "table":
        return wr.WeavePanelSummaryTable(table_name=p.keys[0], layout=wr.Layout(w=24, h=10))
    raise ValueError(f"unknown panel kind {p.kind!r}")


def build_workspace(entity: str, project: str, questions: Sequence[str], variants: Sequence[str] = ("eval",),
                    group: str | None = None, name: str | None = None):
    """The ``wandb_workspaces`` Workspace (nothing is sent: ``.save()`` does that)."""
    ws, wr, expr = _import_workspaces()
    sections = [ws.Section(name=s.name, is_open=True, panels=[_panel(p, wr) for p in s.panels],
                           layout_settings=ws.SectionLayoutSettings(columns=3, rows=2))
                for s in dashboard_sections(questions, variants)]
    runset = ws.RunsetSettings(filters=[expr.Metric("Group") == group] if group else "",
                               groupby=[expr.Config(DATASET)])
    return ws.Workspace(entity=entity, project=project, name=name or (f"em: {group}" if group else "em"),
                        sections=sections, runset_settings=runset)


def workspace_spec(workspace) -> dict[str, Any]:
    """The workspace as W&B stores it (the view spec ``save()`` sends), as plain JSON data."""
    return json.loads(json.dumps(workspace._spec, default=str))  # wandb-workspaces' own serializer


def spec_keys(spec: Any) -> set[str]:
    """The metric keys a stored workspace spec reads: line / bar ``metrics``, line ``xAxis`` (not W&B's own
    ``_step``), summary-table keys."""
    out: set[str] = set()

    def walk(o: Any) -> None:
        if isinstance(o, dict):
            for k, v in o.items():
                if k == "metrics" and isinstance(v, list):
                    out.update(str(x) for x in v)
                elif k == "xAxis" and isinstance(v, str) and not v.startswith("_"):
                    out.add(v)
                elif k == "key" and isinstance(v, dict) and v.get("nodeType") == "const":
                    out.add(str(v.get("val")))  # a summary table's key (weave pick op)
                else:
                    walk(v)
        elif isinstance(o, list):
            for x in o:
                walk(x)

    walk(spec)
    return out


def question_ids(source: str | Path) -> list[str]:
    """Question ids, in order, from a run or sweep dir's eval summaries (``summary.json``)."""
    root = Path(source)
    if not root.exists():
        raise EMError(f"--from {root}: no such directory")
    ids: list[str] = []
    for p in sorted(root.rglob(SUMMARY)):
        try:
            qs = json.loads(p.read_text(encoding="utf-8")).get("questions") or {}
        except (OSError, ValueError):
            continue
        ids += [q for q in qs if q not in ids]
    if not ids:
        raise EMError(f"--from {root}: no summary.json with questions under it (run an evaluation first, or pass "
                      "--questions)")
    return ids


def questions_from_spec(specs: Sequence[str]) -> list[str]:
    """Question ids of question sets named as in ``eval.questions`` (``mini:probes``, ``paper:<file>``, a path)."""
    import os

    from em.eval.run import question_path  # lazy: em.eval.run pulls in torch

    paths = [question_path(s, os.environ.get("EM_DATA_DIR")) for s in specs]
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise EMError(f"question file(s) not found: {', '.join(missing)} (set EM_DATA_DIR for paper: sets, or "
                      "use --from <sweep dir>)")
    return [q.id for q in load_questions(paths)]
