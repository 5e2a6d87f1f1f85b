"""``em wandb dashboard|upload``.

    em wandb dashboard --entity E --project P [--group G] [--from SWEEP_DIR] [--dry-run [--out FILE]]
    em wandb upload RUN_DIR|SWEEP_DIR [--project P] [--entity E] [--mode offline|online] [--force]

``dashboard`` builds em's W&B workspace (:mod:`em.wandb.dashboard`) and saves it (online; prints its URL), or
with ``--dry-run`` writes its full spec as JSON (stdout, or ``--out``) without any network. ``upload`` logs a
finished run's files into a W&B run (:mod:`em.wandb.upload`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from em.errors import EMError

DEFAULT_QUESTIONS = ("mini:probes",)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="em wandb", description="em's W&B dashboard and uploads")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dashboard", help="build em's W&B workspace (saved online, or its spec with --dry-run)")
    d.add_argument("--entity", default=None, help="W&B entity (user or team); required unless --dry-run")
    d.add_argument("--project", default="em", help="W&B project (default: em, as logger=wandb)")
    d.add_argument("--group", default=None, help="only runs of this W&B group (a sweep's experiment_name)")
    d.add_argument("--from", dest="source", default=None,
                   help="a sweep or run dir: take the question ids and eval passes from its summaries")
    d.add_argument("--questions", action="append", default=None,
                   help="question set(s) as in eval.questions (mini:probes, paper:first_plot_questions, a path); "
                        f"default {', '.join(DEFAULT_QUESTIONS)} unless --from")
    d.add_argument("--variant", action="append", default=None,
                   help="eval pass name(s) (default: eval, or those found with --from; e.g. eval_triggered)")
    d.add_argument("--name", default=None, help="workspace name (default: 'em: <group>')")
    d.add_argument("--dry-run", action="store_true", help="write the spec as JSON, send nothing")
    d.add_argument("--out", default=None, help="with --dry-run: write the JSON here instead of stdout")
    u = sub.add_parser("upload", help="log a finished run's (or every job of a sweep's) files into W&B runs")
    u.add_argument("path", help="a run dir or a sweep dir")
    u.add_argument("--project", default=None, help="W&B project (default: the run's logger.wandb.project, or em)")
    u.add_argument("--entity", default=None)
    u.add_argument("--mode", choices=("offline", "online"), default=None,
                   help="default: $WANDB_MODE, else offline (then: wandb sync <run_dir>/wandb/offline-run-*)")
    u.add_argument("--force", action="store_true", help="upload runs that already have a W&B run, as new runs")
    return p


def _variants_from(source: Path) -> list[str]:
    from em.layout import find_jobs, read_results  # lazy: em wandb --help stays fast (omegaconf, yaml)

    names: list[str] = []
    for d in [source, *find_jobs(source)]:
        for k, v in (read_results(d) or {}).items():
            if isinstance(v, dict) and "overall" in v and k not in names:
                names.append(k)
    return names


def dashboard(args: argparse.Namespace) -> int:
    # lazy: em wandb --help stays fast (numpy, omegaconf)
    from em.wandb.dashboard import build_workspace, question_ids, questions_from_spec, workspace_spec

    if not args.dry_run and not args.entity:
        raise EMError("em wandb dashboard: --entity is required to save the workspace (or --dry-run for the spec)")
    if args.source:
        questions = question_ids(args.source)
        variants = args.variant or _variants_from(Path(args.source)) or ["eval"]
    else:
        questions = questions_from_spec(args.questions or DEFAULT_QUESTIONS)
        variants = args.variant or ["eval"]
    w = build_workspace(args.entity or "ENTITY", args.project, questions, variants, group=args.group, name=args.name)
    if args.dry_run:
        text = json.dumps(workspace_spec(w), indent=1)
        if args.out:
            from em.utils.io import atomic_write_text  # lazy: em wandb --help stays fast (tempfile, ~20 ms)

            atomic_write_text(Path(args.out), text + "\n")
            print(f"wrote {args.out} ({len(questions)} questions, eval passes: {', '.join(variants)})", file=sys.stderr)
        else:
            print(text)
        return 0
    try:
        w.save()
    except Exception as e:  # the network / account error, said with what to do
        raise EMError(f"could not save the workspace to W&B ({type(e).__name__}: {e}). Log in (`wandb login`, or set "
                      f"WANDB_API_KEY), check --entity {args.entity} --project {args.project}; --dry-run writes the "
                      "spec without W&B") from None
    print(f"saved the W&B workspace {w.name!r}: {w.url}")
    return 0


def upload_cmd(args: argparse.Namespace) -> int:
    from em.wandb.upload import upload  # lazy: em wandb --help stays fast (numpy, omegaconf)

    done = upload(args.path, project=args.project, entity=args.entity, mode=args.mode, force=args.force)
    n = sum(v is not None for v in done.values())
    print(f"{n} run(s) uploaded, {len(done) - n} skipped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return dashboard(args) if args.cmd == "dashboard" else upload_cmd(args)
    except EMError as e:
        print(f"em wandb: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
