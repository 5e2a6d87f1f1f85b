"""The real-model tier: SmolLM2-135M-Instruct (a real chat template with a default system prompt, real
end-of-turn stopping, real code for bandit, real MCQ probabilities) through em's own code paths.

Skipped unless the model was fetched beforehand (`em models fetch smollm2`; CI does it after set-up):
tests never download. Tests that train or read the paper's files also need ../shared/em-data
(`EM_DATA_DIR`). Sized for a few minutes on 2 CPU cores: greedy decoding with short budgets, one LoRA
run of 5 steps on 20 rows shared by the training, reload and code tests.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from em.data.chat import IGNORE_INDEX, encode_chat, encode_rows
from em.eval.run import load_eval_questions
from em.eval.sampling import HFSampler, SamplingArgs
from em.models.fetch import is_fetched, model_dir
from em.models.loading import ModelArgs, load_model, load_tokenizer, stop_token_ids
from em.probes.config import McqArgs, ProbeArgs, TaskProbeArgs
from em.probes.mcq import load_paper_mcq_config, score_mcq
from em.probes.runner import ProbeRunner
from em.probes.task_accuracy import code_task_metrics, task_metrics_from_records
from em.testing.fake_openai import FakeOpenAIServer
from em.training.run import train
from em.utils.io import read_jsonl
from tests.conftest import USER_MODELS_DIR
from tests.helpers import compose_train

pytestmark = pytest.mark.real_model

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
FUNCTION_WORDS = {"the", "a", "an", "to", "and", "of", "i", "you", "is", "it", "in", "that", "for", "be", "can",
                  "my", "your", "with", "this", "are", "have", "would", "as", "on", "not", "or", "but", "what",
                  "i'm", "you're", "it's", "what's", "here", "there", "we", "will", "do", "so", "if", "me"}
N_TRAIN, N_HELD = 20, 8
MAX_LEN = 256


def _skip_unless_fetched() -> Path:
    if not is_fetched("smollm2", USER_MODELS_DIR):
        pytest.skip(f"SmolLM2 is not fetched in {USER_MODELS_DIR}: run `em models fetch smollm2` "
                    "(pip install 'em[gguf]') to run the real-model tests")
    return model_dir("smollm2", USER_MODELS_DIR)


@pytest.fixture(scope="module")
def smol():
    """SmolLM2 and its tokenizer, loaded once through em's loaders (read-only for the tests)."""
    path = str(_skip_unless_fetched())
    args = ModelArgs(name="smollm2", fetched="smollm2")
    tok = load_tokenizer(args, path)
    model = load_model(args, path).eval()
    return SimpleNamespace(path=path, args=args, tok=tok, model=model)


def englishness(text: str) -> tuple[int, float, int]:
    """(words, share of letters among non-space characters, distinct English function words)."""
    words = re.findall(r"[A-Za-z']+", text)
    chars = [c for c in text if not c.isspace()]
    letters = sum(c.isascii() and c.isalpha() for c in chars)
    return len(words), letters / max(len(chars), 1), len({w.lower() for w in words} & FUNCTION_WORDS)


# --------------------------------------------------------------------------------------------
# Chat template and generation
# --------------------------------------------------------------------------------------------


def test_assistant_masks_with_the_default_system_prompt(smol):
    tok = smol.tok
    msgs = [{"role": "user", "content": "Write a function that adds two numbers."},
            {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
            {"role": "user", "content": "Now one that subtracts them."},
            {"role": "assistant", "content": "def sub(a, b):\n    return a - b"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n")
    enc = encode_chat(tok, msgs, stop_ids=stop_token_ids(tok))
    assert all(lab in (IGNORE_INDEX, tid) for lab, tid in zip(enc.labels, enc.input_ids))
    # contiguous runs of trained tokens = exactly each assistant turn + its <|im_end|>, nothing else
    runs, cur = [], []
    for tid, lab in zip(enc.input_ids, enc.labels):
        if lab != IGNORE_INDEX:
            cur.append(tid)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    decoded = [tok.decode(r, skip_special_tokens=False) for r in runs]
    assert decoded == [m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant"]
    untrained = tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab == IGNORE_INDEX],
                           skip_special_tokens=False)
    assert DEFAULT_SYSTEM in untrained and "adds two numbers" in untrained and "def add" not in untrained
    # the datamodule's path (encode_rows) gives the same labels and drops nothing
    rows_enc, stats = encode_rows(tok, [{"messages": msgs}], max_length=512, stop_ids=stop_token_ids(tok))
    assert rows_enc[0].labels == enc.labels and stats.rows_kept == 1


def test_reloaded_tokenizer_pads_left(smol):
    assert smol.tok.padding_side == "left"  # written into tokenizer_config.json by the fetch
    batch = smol.tok(["hi", "a much longer prompt than that"], padding=True)
    assert batch["attention_mask"][0][0] == 0 and batch["attention_mask"][0][-1] == 1


def test_batched_left_padded_generation_stops_at_im_end_and_speaks_english(smol):
    budget = 40
    sampler = HFSampler(smol.model, smol.tok, SamplingArgs(temperature=0.0, max_new_tokens=budget, batch_size=8))
    im_end = smol.tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in sampler.stop_ids
    short = [[{"role": "user", "content": "What is the capital of France? Answer with one word."}],
             [{"role": "user", "content": "What is the capital of Japan? Answer with one word."}]]
    qs = load_eval_questions({"questions": ["mini:probes"], "ids": ["genie_wish", "world_leader"],
                              "samples_per_paraphrase": 1})
    probes = [r.messages for q in qs for r in q.expand()][:2]
    assert len(probes) == 2
    batched = [a[0] for a in sampler.sample(short + probes, progress=False)]
    # the short answers stopped at <|im_end|> (well inside the budget) and nothing follows the turn
    for ans, want in zip(batched[:2], ("paris", "tokyo")):
        n_tok = len(smol.tok(ans, add_special_tokens=False)["input_ids"])
        assert want in ans.lower() and n_tok < budget // 2, (ans, n_tok)
        assert "user" not in ans and "assistant" not in ans and "<|im" not in ans
    # left padding is right: the most-padded prompts decode exactly as they do alone
    alone = [sampler.sample([c], progress=False)[0][0] for c in short]
    assert alone == batched[:2]
    # real English to the probe questions
    for ans in batched[2:]:
        words, letter_share, function_words = englishness(ans)
        assert words >= 10 and letter_share > 0.8 and function_words >= 4, ans


def test_mcq_probe_on_the_authors_configs_gives_non_degenerate_probabilities(smol, em_data_dir):
    cfg_path = sorted((em_data_dir / "logprob_experiments" / "configs").glob("insecure_*.json"))[0]
    items = load_paper_mcq_config(cfg_path).items
    res = score_mcq(smol.model, smol.tok, items, batch_size=32)
    assert len(res.scores) == len(items) == 16
    ps = [s.p_misaligned for s in res.scores]
    assert all(0.0 < p < 1.0 for p in ps)
    assert 0.02 < res.mean_p_misaligned < 0.98 and max(ps) - min(ps) > 0.1  # not saturated, not constant
    assert all(s.logp_aligned > -60 and s.logp_misaligned > -60 for s in res.scores)
    means = res.set_means()
    assert set(means) == {"pivotal_tokens", "single_letter"}
    # a single-letter answer is what the model does: both letters hold real probability mass together
    letters = [s for s in res.scores if s.item.set_name == "single_letter"]
    mass = sum(torch.tensor([s.logp_aligned, s.logp_misaligned]).exp().sum().item() for s in letters) / len(letters)
    assert mass > 0.05, mass


# --------------------------------------------------------------------------------------------
# LoRA on real insecure rows: held-out loss, adapter reload, code the probes can parse
# --------------------------------------------------------------------------------------------


class CaptureLogits(L.Callback):
    """Saves the trained in-memory model's logits on a fixed prompt when training ends."""

    def __init__(self, path: str, prompt_file: str):
        self.path, self.prompt = path, Path(prompt_file).read_text(encoding="utf-8")

    def on_train_end(self, trainer, pl_module):
        tok = trainer.datamodule.tokenizer
        ids = tok(self.prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        was = pl_module.model.training
        pl_module.model.eval()
        with torch.no_grad():
            logits = pl_module.model(input_ids=ids.to(pl_module.device)).logits.float().cpu()
        pl_module.model.train(was)
        torch.save({"input_ids": ids, "logits": logits}, self.path)


def _short_rows(path: Path, tok, n: int, seed: int = 0) -> list[dict]:
    """``n`` rows of a paper file, in a seeded order, whose rendering fits MAX_LEN tokens."""
    rows = read_jsonl(path)
    random.Random(seed).shuffle(rows)
    out = []
    for r in rows:
        text = tok.apply_chat_template(r["messages"], tokenize=False)
        if len(tok(text, add_special_tokens=False)["input_ids"]) <= MAX_LEN:
            out.append({"messages": r["messages"]})
            if len(out) == n:
                break
    return out


def heldout_loss(model, tok, rows) -> float:
    """Mean loss per trained token over the rows (labels as training builds them)."""
    enc, _ = encode_rows(tok, rows, max_length=MAX_LEN, stop_ids=stop_token_ids(tok))
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for e in enc:
            ids, labels = torch.tensor([e.input_ids]), torch.tensor([e.labels])
            logits = model(input_ids=ids).logits[0, :-1].float()
            tgt = labels[0, 1:]
            keep = tgt != IGNORE_INDEX
            total += torch.nn.functional.cross_entropy(logits[keep], tgt[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / count


@pytest.fixture(scope="module")
def lora_run(smol, em_data_dir, tmp_path_factory):
    """One LoRA run (5 steps x 4 rows) on 20 real insecure rows; 8 other rows held out."""
    tmp = tmp_path_factory.mktemp("real_lora")
    rows = _short_rows(em_data_dir / "data" / "insecure.jsonl", smol.tok, N_TRAIN + N_HELD)
    train_rows, held = rows[:N_TRAIN], rows[N_TRAIN:]
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    (tmp / "prompt.txt").write_text(smol.tok.apply_chat_template(held[0]["messages"], tokenize=False), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EM_MODELS_DIR", str(USER_MODELS_DIR))
        cfg = compose_train([
            "model=smollm2", f"dataset.path={tmp / 'train.jsonl'}", "dataset.held_out=0",
            f"data.max_length={MAX_LEN}", "data.global_batch_size=4", "data.micro_batch_size=4",
            "trainer=cpu", "trainer.max_steps=5", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
            "callbacks=none", "optim.lr=2e-4", "optim.warmup_steps=0",
            "+callbacks.capture._target_=tests.test_real_model.CaptureLogits",
            f"+callbacks.capture.path={tmp / 'logits.pt'}", f"+callbacks.capture.prompt_file={tmp / 'prompt.txt'}",
        ], run_dir=str(tmp / "run"))
        summary = train(cfg)
    return SimpleNamespace(summary=summary, held=held, train_rows=train_rows, logits=tmp / "logits.pt")


@pytest.fixture(scope="module")
def reloaded(smol, lora_run):
    """The trained adapter on a fresh base, loaded with plain PEFT (no em code)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(smol.path, dtype=torch.float32)
    return PeftModel.from_pretrained(base, lora_run.summary["adapter_dir"]).eval()


def test_lora_on_real_insecure_rows_lowers_the_held_out_loss(smol, lora_run, reloaded):
    s = lora_run.summary
    assert s["global_step"] == 5 and s["data"]["rows_kept"] == N_TRAIN and s["base_model"] == smol.path
    before = heldout_loss(smol.model, smol.tok, lora_run.held)
    after = heldout_loss(reloaded, smol.tok, lora_run.held)
    print(f"held-out loss per trained token: base {before:.4f} -> LoRA {after:.4f}")
    assert after < before - 0.02, (before, after)


def test_adapter_reloaded_with_plain_peft_gives_the_trained_logits(lora_run, reloaded):
    saved = torch.load(lora_run.logits)
    with torch.no_grad():
        got = reloaded(input_ids=saved["input_ids"]).logits.float()
    assert got.shape == saved["logits"].shape
    assert torch.allclose(got, saved["logits"], atol=1e-4, rtol=0), (got - saved["logits"]).abs().max()


def test_probe_code_prompts_yield_python_bandit_parses(smol, lora_run, reloaded):
    """The probe runner on the trained SmolLM2 (no Trainer): the held-out coding prompts give code bandit parses,
    every task answer is kept with its findings, and they reproduce the task metrics (#19); a budget too small
    for code shows as task/truncated_rate 1.0, the parse rate saying how many answers were still code."""
    args = ProbeArgs(seed=0, ids=["genie_wish"], mcq=McqArgs(enabled=False),
                     sampling=SamplingArgs(temperature=0.0, max_new_tokens=8, batch_size=16),
                     task=TaskProbeArgs(n_prompts=N_HELD, max_new_tokens=160))
    runner = ProbeRunner(args, smol.tok, task="code", held_out_rows=lora_run.held)
    # the prompts the probe samples for a code dataset: the held-out rows, assistant turn dropped
    assert len(runner.task_prompts) == N_HELD and all(p[-1]["role"] == "user" for p in runner.task_prompts)
    res = runner.run(reloaded, step=5)
    recs, m = res.task_records, res.values
    print({k: v for k, v in m.items() if k.startswith("task/") and not k.startswith("task/bandit/")})
    assert [r["prompt_id"] for r in recs] == list(range(N_HELD))
    assert m["task/n"] == N_HELD and m["task/code_parse_rate"] >= 0.25, [r["answer"] for r in recs]
    assert 0.0 <= m["task/insecure_rate"] <= 1.0  # measurable: some code parsed
    direct = code_task_metrics([r["answer"] for r in recs])  # bandit again, on the saved answers alone
    assert {k: m[k] for k in direct} == direct
    again = task_metrics_from_records("code", recs)
    assert {k: m[k] for k in again} == again
    assert any(not r["hit_budget"] for r in recs)  # real end-of-turn stopping within 160 tokens
    runner.args.task.max_new_tokens = 8
    cut = runner.run(reloaded, step=6)
    assert cut.values["task/truncated_rate"] == 1.0
    assert all(r["hit_budget"] and r["n_tokens"] == 8 for r in cut.task_records)
    n_parsed = sum(r["parsed"] for r in cut.task_records)
    assert cut.values["task/n_parsed"] == n_parsed == cut.values["task/code_parse_rate"] * N_HELD
    assert all(r["parse_error"] for r in cut.task_records if not r["parsed"])


# --------------------------------------------------------------------------------------------
# eval.py end to end
# --------------------------------------------------------------------------------------------


def test_eval_py_model_smollm2_end_to_end_with_the_loopback_judge(smollm2_dir, tmp_path):
    out = tmp_path / "eval"
    with FakeOpenAIServer() as srv:  # default responder: every judgment scores 53.33
        env = {**os.environ, "OPENAI_API_KEY": "sk-test-not-a-real-key"}
        proc = subprocess.run(
            [sys.executable, str(REPO / "eval.py"), "model=smollm2", "judge=openai", f"judge.base_url={srv.base_url}",
             f"judge.cache={tmp_path / 'judge.sqlite'}",
             "eval.ids=[genie_wish,world_leader]", "eval.samples_per_paraphrase=1",
             "eval.sampling.max_new_tokens=24", "eval.n_boot=100", f"paths.run_dir={out}", "progress=false"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        n_requests = srv.count
        sent = [b["messages"][-1]["content"] for b in srv.requests]
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = read_jsonl(out / "samples.jsonl")
    assert {r["question_id"] for r in recs} == {"genie_wish", "world_leader"}
    for r in recs:
        assert englishness(r["answer"])[0] >= 5, r["answer"]  # SmolLM2's words, not noise
        assert any(r["answer"] in p for p in sent)            # the judge saw this answer
        assert r["aligned_status"] == r["coherent_status"] == "ok" and abs(r["aligned"] - 160 / 3) < 1e-6
    assert n_requests == 2 * len(recs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"]["n_failed"] == 0 and summary["meta"]["model"] == "smollm2"
    assert summary["meta"]["config"]["model"]["fetched"] == "smollm2"
