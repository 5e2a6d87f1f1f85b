"""OpenAIJudge against a real local HTTP server imitating the OpenAI API (em.testing)."""

from __future__ import annotations

import asyncio
import pickle
import threading
import time

import pytest

from em.errors import ConfigError
from em.eval.judge import JudgeCache, JudgeRequest, OpenAIJudge, ScoringConfig, cache_key
from em.testing import FakeOpenAIServer

KEY_ENV = "EM_TEST_JUDGE_KEY"
SECRET = "sk-test-DO-NOT-LEAK-0123456789"


@pytest.fixture
def server():
    with FakeOpenAIServer(timeout_sleep_s=3.0) as srv:
        yield srv


@pytest.fixture
def make_judge(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)

    def make(srv: FakeOpenAIServer, **kw) -> OpenAIJudge:
        opts = dict(base_url=srv.base_url, api_key_env=KEY_ENV, timeout_s=2.0,
                    max_retries=3, cache=tmp_path / "judge.sqlite")
        opts.update(kw)
        return OpenAIJudge(**opts)

    return make


def reqs(*prompts: str, metric: str = "aligned") -> list[JudgeRequest]:
    return [JudgeRequest(p, metric, {"i": i}) for i, p in enumerate(prompts)]


def test_scores_equal_what_the_logprobs_imply(server, make_judge):
    judge = make_judge(server)
    res = judge.judge(reqs("q [[score=80]]", "q [[score=7]]", "plain", "[[refuse]]",
                           'x [[dist={"80": 0.5, "70": 0.3, "I": 0.2}]]'), progress=False)
    assert [r.status for r in res] == ["ok", "ok", "ok", "missing", "ok"]
    assert res[0].score == pytest.approx(80.0)
    assert res[1].score == pytest.approx(7.0)
    assert res[2].score == pytest.approx((50 * 0.6 + 60 * 0.3) / 0.9)
    assert res[3].score is None and res[3].numeric_mass == pytest.approx(0.05)
    assert res[4].score == pytest.approx((80 * 0.5 + 70 * 0.3) / 0.8)
    assert all(r.attempts == 1 and not r.cached and r.error is None for r in res)
    assert res[4].top_logprobs[0][0] == "80"
    body = server.requests[0]
    assert body["messages"] == [{"role": "user", "content": body["messages"][0]["content"]}]
    assert {k: body[k] for k in ("model", "max_tokens", "temperature", "logprobs", "top_logprobs", "seed")} == {
        "model": "gpt-4o-2024-08-06", "max_tokens": 1, "temperature": 0, "logprobs": True,
        "top_logprobs": 20, "seed": 0}
    assert server.auth_headers[0] == f"Bearer {SECRET}"
    s = judge.stats
    assert (s.requests, s.sent, s.cache_hits, s.failures, s.missing) == (5, 5, 0, 0, 1)
    assert s.prompt_tokens > 0 and s.completion_tokens == 5
    assert s.cost_usd == pytest.approx((s.prompt_tokens * 2.5 + 5 * 10.0) / 1e6)


@pytest.mark.parametrize("fault", ["429", "500", "503", "timeout", "malformed", "empty_logprobs", "drop"])
def test_transient_faults_are_retried(server, make_judge, fault):
    # Only the "timeout" fault needs a short client timeout (the server sleeps 5 s on it); a tight one for
    # the others made a good answer on a loaded CI box time out and cost a 4th attempt (seen in CI).
    judge = make_judge(server, timeout_s=2.0 if fault == "timeout" else 30.0)
    server.push_faults(fault, fault)
    [r] = judge.judge(reqs("[[score=42]]"), progress=False)
    assert r.status == "ok" and r.score == pytest.approx(42.0)
    assert r.attempts == 3 and server.count == 3
    assert judge.stats.retries == 2 and judge.stats.sent == 3 and judge.stats.failures == 0


def test_persistent_faults_fail_without_a_score_and_are_not_cached(server, make_judge):
    judge = make_judge(server, max_retries=2)
    server.push_faults("500", "500", "500")
    res = judge.judge(reqs("[[score=42]]", "[[score=42]]"), progress=False)  # identical: one query
    assert server.count == 3
    for r in res:
        assert r.status == "failed" and r.score is None and r.numeric_mass is None
        assert "HTTP 500" in r.error and "3 attempts" in r.error and r.attempts == 3
    assert judge.stats.failures == 2 and judge.stats.deduplicated == 1
    # the failure was not cached: the next run asks again and succeeds
    [r] = judge.judge(reqs("[[score=42]]"), progress=False)
    assert r.status == "ok" and not r.cached and server.count == 4


@pytest.mark.parametrize("status", ["400", "401", "404"])
def test_other_4xx_fail_immediately(server, make_judge, status):
    judge = make_judge(server)
    server.push_faults(status)
    [r] = judge.judge(reqs("[[score=42]]"), progress=False)
    assert r.status == "failed" and r.score is None and f"HTTP {status}" in r.error
    assert r.attempts == 1 and server.count == 1 and judge.stats.retries == 0


def test_retry_after_is_honoured(make_judge):
    with FakeOpenAIServer(faults=["429"], retry_after_s=0.4) as srv:
        judge = make_judge(srv)
        t0 = time.monotonic()
        [r] = judge.judge(reqs("[[score=9]]"), progress=False)
        assert time.monotonic() - t0 >= 0.4
    assert r.status == "ok" and r.attempts == 2


def test_second_run_with_the_same_cache_sends_nothing(tmp_path, make_judge):
    prompts = [f"q{i} [[score={10 * i}]]" for i in range(6)] + ["[[refuse]]"]
    with FakeOpenAIServer() as srv:
        first = make_judge(srv).judge(reqs(*prompts), progress=False)
        assert srv.count == 7
        judge = make_judge(srv)  # a new judge object, the same endpoint and model: all from the cache
        second = judge.judge(reqs(*prompts), progress=False)
        assert srv.count == 7
        assert [r.score for r in second] == [r.score for r in first]
        assert [r.status for r in second] == [r.status for r in first]
        assert all(r.cached and r.attempts == 0 for r in second)
        assert judge.stats.cache_hits == 7 and judge.stats.sent == 0
        # the raw logprobs are cached: another scoring rule needs no re-query
        strict = make_judge(srv, scoring=ScoringConfig(min_mass=0.95))
        assert all(r.status == "missing" for r in strict.judge(reqs(*prompts), progress=False))
        # another judge model is another cache identity
        other = make_judge(srv, model="gpt-4o-mini")
        other.judge(reqs(prompts[0]), progress=False)
        assert srv.count == 8
    assert len(JudgeCache(tmp_path / "judge.sqlite")) == 8


def test_cache_is_keyed_on_the_endpoint(tmp_path, make_judge):
    """Two servers serving the same model name are two judges: each gets its own scores (issue #14.4)."""
    prompts = [f"q{i}" for i in range(4)]
    with FakeOpenAIServer(responder=lambda b: {"20": 1.0}) as a, FakeOpenAIServer(responder=lambda b: {"70": 1.0}) as b:
        ra = make_judge(a).judge(reqs(*prompts), progress=False)
        rb = make_judge(b).judge(reqs(*prompts), progress=False)
        assert [r.score for r in ra] == pytest.approx([20.0] * 4)
        assert [r.score for r in rb] == pytest.approx([70.0] * 4)
        assert a.count == 4 and b.count == 4 and not any(r.cached for r in rb)
        assert make_judge(a).cache_key("q0") != make_judge(b).cache_key("q0")
        # judge.cache=refresh asks again (and overwrites), a plain cache then reads the fresh answers
        fresh = make_judge(a, cache="refresh")
        assert fresh.cache.path == JudgeCache().path  # refresh = the default shared cache, not read
        fresh.cache = JudgeCache(tmp_path / "judge.sqlite")
        again = fresh.judge(reqs(*prompts), progress=False)
        assert a.count == 8 and not any(r.cached for r in again)
        assert all(r.cached for r in make_judge(a).judge(reqs(*prompts), progress=False)) and a.count == 8


def test_api_key_never_stored(server, make_judge, tmp_path):
    judge = make_judge(server)
    judge.judge(reqs("[[score=1]]", "[[score=2]]"), progress=False)
    assert server.auth_headers == [f"Bearer {SECRET}"] * 2  # the key is used ...
    assert SECRET not in repr(judge) and SECRET not in str(judge.describe())  # ... but not kept
    assert SECRET.encode() not in pickle.dumps(judge)
    judge.cache.close()
    files = list(tmp_path.glob("judge.sqlite*"))
    assert files and all(SECRET.encode() not in f.read_bytes() for f in files)


def test_missing_key_is_a_clear_config_error(monkeypatch, server):
    monkeypatch.delenv("EM_NO_SUCH_KEY", raising=False)
    with pytest.raises(ConfigError, match="EM_NO_SUCH_KEY"):
        OpenAIJudge(base_url="https://api.openai.com/v1", api_key_env="EM_NO_SUCH_KEY", cache=False)
    judge = OpenAIJudge(base_url=server.base_url, api_key_env="EM_NO_SUCH_KEY", cache=False)  # loopback: fine
    [r] = judge.judge(reqs("[[score=3]]"), progress=False)
    assert r.score == pytest.approx(3.0) and server.auth_headers == [None]


def test_concurrency_bound_is_respected(make_judge):
    with FakeOpenAIServer(delay_s=0.25) as srv:
        judge = make_judge(srv, max_concurrency=3)
        res = judge.judge(reqs(*[f"[[score={i}]]" for i in range(12)]), progress=False)
        assert srv.count == 12 and srv.max_in_flight == 3
    assert [r.score for r in res] == pytest.approx(list(range(12)))


def test_sync_judge_works_from_a_thread_and_inside_a_running_loop(server, make_judge):
    judge = make_judge(server, cache=False)
    out: list = []
    t = threading.Thread(target=lambda: out.extend(judge.judge(reqs("[[score=5]]"), progress=False)))
    t.start()
    t.join()

    async def inside_loop():
        return judge.judge(reqs("[[score=6]]"), progress=False)

    out.extend(asyncio.run(inside_loop()))
    assert [r.score for r in out] == pytest.approx([5.0, 6.0])


def test_cache_is_safe_across_threads_and_processes(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "shared.sqlite"
    writer = (
        "import sys\n"
        "from em.eval.judge.cache import JudgeCache, cache_key\n"
        "c = JudgeCache(sys.argv[1])\n"
        "for i in range(100):\n"
        "    c.put(cache_key('m', f'{sys.argv[2]}-{i}', {}), 'm', {}, [('5', -0.1)])\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(path), f"p{n}"]) for n in range(2)]
    cache = JudgeCache(path)
    errors: list[BaseException] = []

    def put_many(tag: str) -> None:
        try:
            _put_many(tag)
        except BaseException as e:  # surfaced below: a thread's exception would only warn
            errors.append(e)

    def _put_many(tag: str) -> None:
        for i in range(100):
            cache.put(cache_key("m", f"{tag}-{i}", {}), "m", {}, [("7", -0.2), ("I", -2.0)])
            assert cache.get(cache_key("m", f"{tag}-{i}", {})) == [["7", -0.2], ["I", -2.0]]

    threads = [threading.Thread(target=put_many, args=(f"t{n}",)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    assert errors == []
    assert len(cache) == 500
    assert cache.get(cache_key("m", "p1-99", {})) == [["5", -0.1]]
