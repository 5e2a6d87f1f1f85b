"""Training throughput and memory: em vs trl's ``SFTTrainer`` vs a plain HF ``Trainer``, side by side.

    python benchmarks/train_throughput.py                       # tiny model (+ SmolLM2-135M when found)
    python benchmarks/train_throughput.py --models smollm2 --repeats 3 --dataset insecure
    python benchmarks/train_throughput.py --em-variant sorted: --em-variant shuffled:data.group_by_length=false
    python benchmarks/train_throughput.py --sides em --em-variant now: --em-variant plain:model.cross_entropy=plain
    python benchmarks/train_throughput.py --em-variant em: --em-variant 'mmap:$MALLOC_MMAP_THRESHOLD_=1048576'

Every side trains the *same rows* (em's train split of ``--dataset``) with the same LoRA config, micro batch,
max length, precision, optimizer settings and number of steps, each run in a **fresh subprocess** (so its peak
RSS is its own; imports are not timed) with ``OMP_NUM_THREADS=1`` on every side (two shared cores: one thread
each keeps the comparison about the code, not about who got the second core). Runs are interleaved (the order
rotates each repeat) and the load average is recorded before each.

- ``em``: ``em.training.run.train(cfg)`` as ``train.py`` runs it (Lightning, em's data preparation and
  batching), ``callbacks=none``; ``--em-variant NAME:k=v,k=v`` adds em runs with other Hydra overrides (e.g.
  the batch order ``data.group_by_length`` of issue 18; ``$VAR=value`` sets an environment variable of that
  run), compared with the first em variant as well;
- ``trl``: ``trl.SFTTrainer`` on the rows as prompt/completion conversations (loss on the completion = the
  assistant turn, as em), from the model path, default collator and sampler (what a trl user gets);
- ``hf``: ``transformers.Trainer`` on em's tokenized examples (em's labels, right padding), default sampler.

Timing: each step's start is stamped where the batch enters the step (em: Lightning's ``on_train_batch_start``;
trl / hf: a forward pre-hook on the PEFT model); throughput is taken over the steps
after ``--warmup`` (the interval from the start of step ``warmup`` to the start of the last step, i.e. whole
steps including data loading, backward and the optimizer). Per step it also counts samples, trained tokens
(labels != -100), computed positions (batch x padded length) and real tokens (attention mask), so the
padding fraction is 1 - real / positions. The timed window holds a few rows (12 on SmolLM2) and every side's
sampler draws its own, so the window's trained tokens vary with the draw (on SmolLM2, rows cut at 256 tokens
keep 1 to 210 answer tokens); *trained tokens/s (rows)* = samples/s x the mean trained tokens per row over
all the side's rows (the same rows for every side) takes that draw out and is the one the headline ratio
uses. Reported per side: min / median / max over repeats; per em variant
the median of the paired ratios em / trl and em / hf (pairs = the same repeat) and their range.

No timed assertions anywhere: a test only checks that a tiny budget runs and prints these fields.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIDES = ("em", "trl", "hf")
METRICS = ("samples_per_s", "trained_tokens_per_s", "rows_trained_tokens_per_s", "positions_per_s",
           "padding_fraction", "peak_rss_mb", "peak_gpu_mb", "step_s", "max_padded_length")

#: Per-model defaults: the tiny model at em's tiny recipe, SmolLM2 at the issue's 2 x 256 (a step is seconds).
MODEL_DEFAULTS = {
    "tiny": {"batch": 8, "max_length": 512, "steps": 30, "warmup": 3},
    "smollm2": {"batch": 2, "max_length": 256, "steps": 8, "warmup": 2},
}


# ------------------------------------------------------------------------------------------------------------
# the worker: one side, one run, in its own process
# ------------------------------------------------------------------------------------------------------------

def rss_mb() -> float:
    """Current resident set size (MB) from /proc (Linux), else the peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except OSError:  # pragma: no cover - not Linux
        return peak_rss_mb()


def peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1e6 if sys.platform == "darwin" else r / 1e3  # bytes on macOS, KiB on Linux


class StepRecorder:
    """Stamps every forward of the trained model: time, samples, positions, real and trained tokens."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.steps: list[dict] = []
        self.rss: dict[str, float] = {}
        self.handle = None

    def attach(self, model) -> None:
        if self.handle is None:
            self.rss["train_start"] = rss_mb()
            self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        import torch

        if module.training and torch.is_grad_enabled():
            self.record(kwargs if "input_ids" in kwargs else dict(kwargs, input_ids=args[0]))

    def record(self, batch: dict) -> None:
        """One training step starts now, on ``batch``."""
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        ids = batch["input_ids"]
        labels = batch.get("labels")
        mask = batch.get("attention_mask")
        b, n = ids.shape
        samples = int(b)
        pos = batch.get("position_ids")
        if mask is None and pos is not None:  # packed rows (data.packing): each starts where position_ids are 0
            samples = int((pos == 0).sum())
        self.steps.append({
            "t": t, "samples": samples, "positions": int(b * n),
            "real": int(mask.sum()) if mask is not None else int(b * n),
            "trained": int((labels != -100).sum()) if labels is not None else 0,
        })
        if len(self.steps) == 2:
            self.rss["after_first_step"] = rss_mb()

    def summary(self, warmup: int) -> dict:
        # every recorded step counts for the longest batch (memory depends on it, also in the warm-up)
        max_len = max(x["positions"] // max(x["samples"], 1) for x in self.steps) if self.steps else 0
        s = self.steps
        if len(s) < warmup + 2:
            raise RuntimeError(f"only {len(s)} steps recorded; need steps > warmup + 1 ({warmup + 1})")
        window = s[warmup:-1]  # whole steps: from the start of step `warmup` to the start of the last one
        dt = s[-1]["t"] - s[warmup]["t"]
        tot = {k: sum(x[k] for x in window) for k in ("samples", "positions", "real", "trained")}
        return {
            "timed_steps": len(window), "timed_s": dt, "step_s": dt / len(window),
            "samples_per_s": tot["samples"] / dt, "trained_tokens_per_s": tot["trained"] / dt,
            "positions_per_s": tot["positions"] / dt, "real_tokens_per_s": tot["real"] / dt,
            "padding_fraction": 1 - tot["real"] / max(tot["positions"], 1),
            "trained_tokens_per_sample": tot["trained"] / max(tot["samples"], 1),
            "steps_recorded": len(s), "max_padded_length": max_len,
        }


#: set by the worker so that the Lightning callback that Hydra instantiates by name (callbacks.extra) finds it
RECORDER: StepRecorder | None = None


def _lightning_callback_class():
    import lightning as L

    class EmStepRecorder(L.Callback):
        # em's step may not call the PEFT model's forward (model.cross_entropy=chunked runs the backbone): the
        # step starts are stamped here, where Lightning hands the batch to training_step
        def on_train_start(self, trainer, pl_module):
            RECORDER.rss["train_start"] = rss_mb()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            RECORDER.record(batch)

    return EmStepRecorder


def make_em_recorder():
    """Hydra target (``callbacks.extra.bench._target_``) for the em side."""
    return _lightning_callback_class()()


def _compose(overrides: list[str], check: bool = True):
    """``conf/train.yaml`` with ``overrides``, checked as train.py checks it."""
    from hydra import compose, initialize_config_dir

    from em.schemas import check_config

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    if check:
        check_config(cfg, "train")
    return cfg


def _dataset_args(spec: dict):
    from em.config import section

    return section(_compose([f"dataset={spec['dataset']}"], check=False), "dataset")


def _train_rows(spec: dict) -> list[dict]:
    """em's train split of the dataset (held-out rows removed with em's seeded split): the rows every side gets."""
    from em.data.datamodule import ChatDataModule, DataArgs

    dm = ChatDataModule(_dataset_args(spec), DataArgs(max_length=spec["max_length"]), tokenizer=None,
                        seed=spec["seed"])
    dm.load()
    return dm.train_rows


def _lora_config(spec: dict):
    from peft import LoraConfig

    lo = spec["lora"]
    return LoraConfig(r=lo["r"], lora_alpha=lo["alpha"], lora_dropout=lo["dropout"], use_rslora=lo["rslora"],
                      target_modules=list(lo["targets"]), bias="none", task_type="CAUSAL_LM")


def _hf_training_args(spec: dict, out_dir: str, cls=None):
    import torch
    from transformers import TrainingArguments

    cls = cls or TrainingArguments
    cuda = torch.cuda.is_available() and not spec["cpu"]
    return dict(
        output_dir=out_dir, per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1,
        max_steps=spec["steps"], learning_rate=spec["lr"], weight_decay=0.01, warmup_steps=spec["warmup_lr"],
        lr_scheduler_type="linear", max_grad_norm=1.0, optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, logging_steps=10_000, save_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, seed=spec["seed"], use_cpu=not cuda, bf16=spec["precision"] == "bf16",
        gradient_checkpointing=spec["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False} if spec["gradient_checkpointing"] else None,
    )


def _torch_dtype(spec: dict):
    import torch

    return torch.bfloat16 if spec["precision"] == "bf16" else torch.float32


def run_em(spec: dict, rec: StepRecorder, out_dir: str) -> dict:
    from em.training.run import train

    ov = [f"dataset={spec['dataset']}", "callbacks=none", "logger=csv", f"paths.run_dir={out_dir}",
          f"data.micro_batch_size={spec['batch']}", f"data.global_batch_size={spec['batch']}",
          f"data.max_length={spec['max_length']}", "data.cache_tokenized=false",
          f"trainer.max_steps={spec['steps']}", "trainer.enable_progress_bar=false", "trainer.limit_val_batches=0",
          f"optim.lr={spec['lr']}", f"optim.warmup_steps={spec['warmup_lr']}", "optim.weight_decay=0.01",
          "finetune=rslora", f"finetune.r={spec['lora']['r']}", f"finetune.alpha={spec['lora']['alpha']}",
          f"finetune.dropout={spec['lora']['dropout']}", f"finetune.use_rslora={spec['lora']['rslora']}",
          f"seed={spec['seed']}", f"+callbacks.extra.bench._target_={__name__}.make_em_recorder",
          f"model.gradient_checkpointing={spec['gradient_checkpointing']}", "model.attn_implementation=sdpa"]
    ov.append("trainer=gpu" if not spec["cpu"] and _cuda() else "trainer=cpu")
    ov.append(f"trainer.precision={'bf16-mixed' if spec['precision'] == 'bf16' else '32-true'}")
    if spec["model"] == "tiny":
        ov += ["model=tiny"]
    else:
        ov += ["model=hf", f"model.name_or_path={spec['model_path']}", f"model.name={spec['model']}"]
    ov.append(f"model.dtype={'bfloat16' if spec['precision'] == 'bf16' else 'float32'}")
    ov += list(spec.get("em_overrides") or [])
    summary = train(_compose(ov))
    data = summary.get("data") or {}
    return {"overrides": ov, "data": data,
            "trained_tokens_per_row": data["trained_tokens"] / data["rows_kept"] if data.get("rows_kept") else None}


def _hf_callback(rec: StepRecorder):
    from transformers import TrainerCallback

    class Attach(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            rec.attach(model)

    return Attach()


def run_trl(spec: dict, rec: StepRecorder, out_dir: str) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from em.models.loading import ModelArgs, load_tokenizer

    rows = _train_rows(spec)
    # em's tokenizer set-up (pad token) for every side
    tok = load_tokenizer(ModelArgs(name=spec["model"], name_or_path=spec["model_path"]), spec["model_path"])
    pc = []
    for r in rows:
        msgs = r["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        pc.append({"prompt": [dict(role=m["role"], content=m["content"]) for m in msgs[:last]],
                   "completion": [dict(role="assistant", content=msgs[last]["content"])]})
    ds = Dataset.from_list(pc)
    args = SFTConfig(**_hf_training_args(spec, out_dir), max_length=spec["max_length"], packing=False,
                     completion_only_loss=True, dataset_num_proc=None,
                     model_init_kwargs={"dtype": _torch_dtype(spec), "attn_implementation": "sdpa"})
    trainer = SFTTrainer(model=spec["model_path"], args=args, train_dataset=ds, processing_class=tok,
                         peft_config=_lora_config(spec), callbacks=[_hf_callback(rec)])
    trainer.train()
    import trl

    trained = [sum(1 for x in labels if x != -100) for labels in trainer.train_dataset["labels"]]
    return {"trl_version": trl.__version__, "rows": len(ds), "trained_tokens_per_row": sum(trained) / len(trained)}


def run_hf(spec: dict, rec: StepRecorder, out_dir: str) -> dict:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from em.data.chat import encode_rows
    from em.data.collate import PadCollator
    from em.models.loading import ModelArgs, load_tokenizer, stop_token_ids

    rows = _train_rows(spec)
    tok = load_tokenizer(ModelArgs(name=spec["model"], name_or_path=spec["model_path"]), spec["model_path"])
    examples, stats = encode_rows(tok, rows, spec["max_length"], "truncate", stop_token_ids(tok))
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=_torch_dtype(spec),
                                                 attn_implementation="sdpa")
    model = get_peft_model(model, _lora_config(spec))
    trainer = Trainer(model=model, args=TrainingArguments(**_hf_training_args(spec, out_dir),
                                                          remove_unused_columns=False),
                      train_dataset=examples, data_collator=PadCollator(tok.pad_token_id),
                      callbacks=[_hf_callback(rec)])
    trainer.train()
    return {"rows": stats.rows_kept, "trained_tokens_per_row": stats.trained_tokens / stats.rows_kept}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def worker(spec: dict, result_file: str) -> None:
    global RECORDER
    import torch

    torch.manual_seed(spec["seed"])
    cuda = _cuda() and not spec["cpu"]
    rec = RECORDER = StepRecorder(cuda)
    rec.rss["after_imports"] = rss_mb()
    side = spec["side"]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"bench-{side}-") as out_dir:
        info = {"em": run_em, "trl": run_trl, "hf": run_hf}[side](spec, rec, out_dir)
    res = {"side": spec["name"], "kind": side, "wall_s": time.perf_counter() - t0, **rec.summary(spec["warmup"]),
           "peak_rss_mb": peak_rss_mb(), "rss_checkpoints_mb": rec.rss, "info": info,
           "threads": torch.get_num_threads()}
    if info.get("trained_tokens_per_row"):
        res["rows_trained_tokens_per_s"] = res["samples_per_s"] * info["trained_tokens_per_row"]
    if cuda:
        res["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 1e6
        res["peak_gpu_reserved_mb"] = torch.cuda.max_memory_reserved() / 1e6
    Path(result_file).write_text(json.dumps(res))


# ------------------------------------------------------------------------------------------------------------
# the driver
# ------------------------------------------------------------------------------------------------------------

def find_smollm2(explicit: str | None = None) -> Path | None:
    """SmolLM2-135M(-Instruct) as an HF directory: ``--smollm2``, ``$EM_SMOLLM2_DIR``, or em's cache."""
    cands: list[Path] = []
    if explicit:
        cands.append(Path(explicit).expanduser())
    if os.environ.get("EM_SMOLLM2_DIR"):
        cands.append(Path(os.environ["EM_SMOLLM2_DIR"]).expanduser())
    from em.utils.io import em_cache_dir

    root = em_cache_dir()
    for pat in ("models/*smollm2*", "models/*SmolLM2*", "*smollm2*", "models/*/*smollm2*", "models/*/*SmolLM2*"):
        cands.extend(sorted(root.glob(pat)))
    for c in cands:
        if (c / "config.json").is_file():
            return c
    return None


def parse_variant(s: str) -> tuple[str, list[str], dict[str, str]]:
    """``NAME:k=v,$VAR=value,...`` -> (name, Hydra overrides, environment)."""
    name, _, rest = s.partition(":")
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise SystemExit(f"--em-variant {s!r}: expected NAME:key=value,key=value (NAME alphanumeric)")
    items = [x for x in rest.split(",") if x]
    env = dict(x[1:].split("=", 1) for x in items if x.startswith("$") and "=" in x)
    return name, [x for x in items if not x.startswith("$")], env


def _stats(xs: list[float]) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)} if xs else {}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for p in ("torch", "transformers", "peft", "lightning", "trl", "datasets", "accelerate"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "platform": platform.platform()}


def run_one(spec: dict, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               WANDB_MODE="offline", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.update(spec.get("env") or {})
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-res-") as d:
        rf = Path(d) / "result.json"
        log = Path(d) / "log.txt"
        with open(log, "w") as lf:
            p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec),
                                "--result-file", str(rf)], env=env, stdout=lf, stderr=subprocess.STDOUT,
                               timeout=timeout, cwd=str(REPO))
        if p.returncode != 0 or not rf.exists():
            tail = log.read_text(errors="replace")[-3000:]
            return {"side": spec["name"], "kind": spec["side"], "error": f"exit {p.returncode}", "log_tail": tail,
                    "loadavg_before": load}
        res = json.loads(rf.read_text())
    res["loadavg_before"] = load
    return res


def summarise(runs: list[dict], names: list[str]) -> dict:
    ok = [r for r in runs if "error" not in r]
    by = {n: [r for r in ok if r["side"] == n] for n in names}
    sides = {n: {m: _stats([r[m] for r in rs if m in r]) for m in METRICS} | {"runs": len(rs)}
             for n, rs in by.items()}
    ratios: dict[str, dict] = {}
    em_names = [n for n in names if n not in ("trl", "hf")]
    refs = [n for n in ("trl", "hf") if n in names] + em_names[:1]
    for a in em_names:
        for b in refs:
            if a == b:
                continue
            for m in ("samples_per_s", "trained_tokens_per_s", "rows_trained_tokens_per_s", "positions_per_s",
                      "peak_rss_mb", "peak_gpu_mb"):
                pairs = [ra[m] / rb[m] for ra in by[a] for rb in by[b]
                         if ra["repeat"] == rb["repeat"] and m in ra and m in rb and rb[m]]
                if pairs:
                    ratios.setdefault(f"{a}/{b}", {})[m] = {"median_paired": statistics.median(pairs),
                                                            **{k: v for k, v in _stats(pairs).items() if k != "median"},
                                                            "pairs": len(pairs)}
    loads = [r["loadavg_before"][0] for r in runs if "loadavg_before" in r]
    return {"sides": sides, "ratios": ratios, "loadavg_1min": _stats(loads),
            "errors": [{k: r[k] for k in ("side", "error", "log_tail")} for r in runs if "error" in r]}


def _fmt(st: dict, scale: float = 1.0, digits: int = 1) -> str:
    if not st:
        return "-"
    return f"{st['median'] * scale:.{digits}f} ({st['min'] * scale:.{digits}f}–{st['max'] * scale:.{digits}f})"


def _variant_label(v: dict | None) -> str:
    if not v or not (v["overrides"] or v["env"]):
        return ""
    return " (" + ", ".join([*v["overrides"], *(f"${k}={x}" for k, x in v["env"].items())]) + ")"


def print_report(report: dict) -> None:
    m, v = report["machine"], report["versions"]
    print(f"machine: {m['cpu']} ({m['cores']} cores){', GPU ' + m['gpu'] if m['gpu'] else ''}; "
          + ", ".join(f"{k} {x}" for k, x in v.items() if x) + f"; OMP_NUM_THREADS={report['threads']} on every side")
    for note in report["notes"]:
        print(f"note: {note}")
    for model, r in report["models"].items():
        s = r["summary"]
        print(f"\n## {model}  ({r['spec']['batch']} x {r['spec']['max_length']}, {r['spec']['precision']}, "
              f"LoRA r{r['spec']['lora']['r']}, {r['spec']['steps']} steps ({r['spec']['warmup']} warm-up), "
              f"{r['repeats']} repeats, load avg {_fmt(s['loadavg_1min'], digits=2)})")
        print("| side | samples/s | trained tokens/s (window) | trained tokens/s (rows) | positions/s | padding "
              "| peak RSS MB | peak GPU MB | longest batch |\n|---|---|---|---|---|---|---|---|---|")
        for n, st in s["sides"].items():
            print(f"| {n}{_variant_label(r['variants'].get(n))} | {_fmt(st['samples_per_s'], digits=2)} | "
                  f"{_fmt(st['trained_tokens_per_s'], digits=0)} | {_fmt(st['rows_trained_tokens_per_s'], digits=0)} | "
                  f"{_fmt(st['positions_per_s'], digits=0)} | {_fmt(st['padding_fraction'], 100, 1)}% | "
                  f"{_fmt(st['peak_rss_mb'], digits=0)} | {_fmt(st['peak_gpu_mb'], digits=0)} | "
                  f"{_fmt(st['max_padded_length'], digits=0)} |")
        print("| ratio | samples/s | trained tokens/s (window) | trained tokens/s (rows) | positions/s | peak RSS "
              "| peak GPU |")
        print("|---|---|---|---|---|---|---|")
        for k, v in s["ratios"].items():
            cells = []
            for m in ("samples_per_s", "trained_tokens_per_s", "rows_trained_tokens_per_s", "positions_per_s",
                      "peak_rss_mb", "peak_gpu_mb"):
                x = v.get(m)
                cells.append(f"{x['median_paired']:.2f}× ({x['min']:.2f}–{x['max']:.2f})" if x else "-")
            print(f"| {k} | " + " | ".join(cells) + " |")
        for e in s["errors"]:
            print(f"!! {e['side']} failed ({e['error']}):\n{e['log_tail']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="auto",
                    help="comma list of tiny, smollm2 or an HF model dir; auto = tiny (+ smollm2 when found)")
    ap.add_argument("--smollm2", default=None, help="SmolLM2 HF directory (default: $EM_SMOLLM2_DIR or em's cache)")
    ap.add_argument("--sides", default="em,trl,hf", help="which of em, trl, hf (trl is skipped when not installed)")
    ap.add_argument("--em-variant", action="append", default=[],
                    help="NAME:key=value,... an em run with these Hydra overrides (repeatable); the first is the "
                         "reference of the em-vs-em ratios. Default: one variant 'em' with none")
    ap.add_argument("--dataset", default="mini_insecure", help="em dataset config (insecure needs EM_DATA_DIR)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default per model)")
    ap.add_argument("--warmup", type=int, default=None, help="steps left out of the timing (default per model)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                    help="fp32 (default on CPU) or bf16 (weights and autocast; default on a bf16 GPU)")
    ap.add_argument("--lora-r", type=int, default=32)
    ap.add_argument("--lora-alpha", type=float, default=64)
    ap.add_argument("--no-rslora", action="store_true")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every side (default 1)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--cpu", action="store_true", help="train on the CPU even where a GPU is visible")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    ap.add_argument("--json", default=None, help="also write the whole report here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(json.loads(a.worker), a.result_file)
        return 0

    import importlib.util

    sides = [s.strip() for s in a.sides.split(",") if s.strip()]
    bad = [s for s in sides if s not in SIDES]
    if bad:
        raise SystemExit(f"--sides: unknown {bad}; expected some of {SIDES}")
    notes: list[str] = []
    if "trl" in sides and importlib.util.find_spec("trl") is None:
        sides.remove("trl")
        notes.append("trl is not installed (pip install 'em[bench]'): the trl side is skipped")
    variants = [parse_variant(v) for v in a.em_variant] or [("em", [], {})]
    if len({n for n, _, _ in variants} | {"trl", "hf"}) != len(variants) + 2:
        raise SystemExit("--em-variant names must be distinct and not 'trl' / 'hf'")

    from em.models.tiny import materialize_tiny

    models: list[tuple[str, Path]] = []
    for m in (["tiny", "smollm2"] if a.models == "auto" else a.models.split(",")):
        m = m.strip()
        if m == "tiny":
            models.append(("tiny", materialize_tiny()))
        elif m == "smollm2":
            p = find_smollm2(a.smollm2)
            if p is None:
                notes.append("SmolLM2 not found (em models fetch smollm2, --smollm2 DIR or $EM_SMOLLM2_DIR): skipped")
                if a.models != "auto":
                    raise SystemExit(notes[-1])
            else:
                models.append(("smollm2", p))
        elif (Path(m) / "config.json").is_file():
            models.append((Path(m).name, Path(m)))
        else:
            raise SystemExit(f"--models: {m!r} is not tiny, smollm2 or an HF model directory")

    cuda = _cuda() and not a.cpu
    precision = a.precision or ("bf16" if cuda else "fp32")
    report = {"machine": machine(), "versions": versions(), "command": " ".join([sys.executable, *sys.argv]),
              "threads": a.threads, "notes": notes, "models": {}}
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    for mname, mpath in models:
        d = MODEL_DEFAULTS.get(mname, MODEL_DEFAULTS["smollm2"])
        base = {
            "model": mname, "model_path": str(mpath), "dataset": a.dataset,
            "batch": a.batch or d["batch"], "max_length": a.max_length or d["max_length"],
            "steps": a.steps or d["steps"], "warmup": d["warmup"] if a.warmup is None else a.warmup,
            "warmup_lr": 0, "precision": precision, "lr": a.lr, "seed": a.seed, "threads": a.threads,
            "cpu": a.cpu, "gradient_checkpointing": a.gradient_checkpointing,
            "lora": {"r": a.lora_r, "alpha": a.lora_alpha, "dropout": 0.0, "rslora": not a.no_rslora,
                     "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        }
        if base["steps"] < base["warmup"] + 2:
            raise SystemExit(f"--steps must be at least --warmup + 2 ({base['warmup'] + 2})")
        runs_spec = [dict(base, side="em", name=n, em_overrides=ov, env=env) for n, ov, env in variants
                     if "em" in sides]
        runs_spec += [dict(base, side=s, name=s) for s in ("trl", "hf") if s in sides]
        runs: list[dict] = []
        for rep in range(a.repeats):
            k = rep % len(runs_spec)
            for spec in runs_spec[k:] + runs_spec[:k]:  # rotate the order every repeat
                print(f"[{mname}] repeat {rep + 1}/{a.repeats}: {spec['name']} ...", file=sys.stderr, flush=True)
                res = run_one(spec, a.timeout)
                res["repeat"] = rep
                runs.append(res)
                if "error" in res:
                    print(f"  failed: {res['error']}\n{res['log_tail']}", file=sys.stderr)
                else:
                    print(f"  {res['trained_tokens_per_s']:.0f} trained tok/s (window), "
                          f"{res.get('rows_trained_tokens_per_s', 0):.0f} (rows), "
                          f"{res['samples_per_s']:.2f} samples/s, "
                          f"peak RSS {res['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
        names = [s["name"] for s in runs_spec]
        report["models"][mname] = {"spec": base, "repeats": a.repeats,
                                   "variants": {n: {"overrides": ov, "env": env} for n, ov, env in variants},
                                   "summary": summarise(runs, names), "runs": runs}
    print_report(report)
    print("\n" + json.dumps({m: r["summary"]["ratios"] for m, r in report["models"].items()}))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    return 1 if any(r["summary"]["errors"] for r in report["models"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
