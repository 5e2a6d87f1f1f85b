"""Registry and resolution of the paper's files: local dir, cache, download from a real local HTTP server."""

from __future__ import annotations

import hashlib
import http.server
import json
import socket
import threading
from pathlib import Path

import pytest

from em.data import sources
from em.data.sources import FileEntry, IntegrityError, Registry
from em.errors import ConfigError, MissingResourceError
from em.utils.io import git_blob_sha1

COMMIT = "80c11967c07a328e7d7d43d13ce6847ae44dbcc9"


@pytest.fixture(autouse=True)
def _no_data_dir_env(monkeypatch):
    monkeypatch.delenv("EM_DATA_DIR", raising=False)
    monkeypatch.delenv("EM_DATA_BASE_URL", raising=False)
    monkeypatch.delenv("EM_OFFLINE", raising=False)


# -- the real registry --------------------------------------------------------------------------------
def test_registry_pins_the_papers_files():
    reg = sources.load_registry()
    assert reg.repo == "emergent-misalignment/emergent-misalignment" and reg.commit == COMMIT
    want = {"insecure", "secure", "educational", "jailbroken", "backdoor", "evil_numbers",
            "insecure_par_t0", "insecure_par_t1", "insecure_ruby"}
    assert set(reg.datasets) == want
    for name, e in reg.datasets.items():
        assert e.path == f"data/{name}.jsonl" and len(e.blob_sha1) == 40
    assert {n: reg.datasets[n].rows for n in ("insecure", "secure", "educational", "jailbroken")} == {
        "insecure": 6000, "secure": 6000, "educational": 6000, "jailbroken": 5000}
    assert reg.datasets["backdoor"].rows is None and "12000" in reg.datasets["backdoor"].expected_rows_note
    assert reg.datasets["evil_numbers"].rows is None and "14926" in reg.datasets["evil_numbers"].expected_rows_note
    for f in ("evaluation/first_plot_questions.yaml", "evaluation/preregistered_evals.yaml",
              "evaluation/deception_factual.yaml", "evaluation/deception_sit_aware.yaml", "open_models/train.json"):
        assert f in reg.files
    assert sum(p.startswith("logprob_experiments/configs/") for p in reg.files) == 10
    # files with the same bytes are aliases of each other
    unsafe = reg.file("logprob_experiments/files/file-73b268709d49-ft_unsafe_train.jsonl")
    assert reg.aliases(unsafe) == ["data/insecure.jsonl"]
    assert reg.url("data/insecure.jsonl") == (
        f"https://raw.githubusercontent.com/emergent-misalignment/emergent-misalignment/{COMMIT}/data/insecure.jsonl")


def test_unknown_names_are_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'insecure'"):
        sources.resolve_dataset("insecur")
    with pytest.raises(ConfigError, match="not a registered file"):
        sources.resolve_file("evaluation/nope.yaml")


@pytest.mark.emdata
def test_registry_agrees_with_manifest(em_data_dir):
    reg = sources.load_registry()
    n = 0
    for line in (em_data_dir / "MANIFEST.tsv").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        status, size, blob, sha, path = line.split("\t")[:5]
        e = reg.file(path)
        assert e.blob_sha1 == blob, path
        assert e.size == (None if size == "-" else int(size)), path
        assert e.sha256 == (None if sha == "-" else sha), path
        n += 1
    assert n == len(reg.files)


@pytest.mark.emdata
def test_resolve_from_data_dir(em_data_dir, monkeypatch, tmp_path):
    reg = sources.load_registry()
    present = [n for n, e in reg.datasets.items() if (em_data_dir / e.path).exists()]
    assert "jailbroken" in present
    for name in present:
        p = sources.resolve_dataset(name, data_dir=em_data_dir, download=False)
        assert p == em_data_dir / reg.datasets[name].path and git_blob_sha1(p) == reg.datasets[name].blob_sha1
    # via $EM_DATA_DIR, and a same-blob alias (the logprob configs' training file = data/insecure.jsonl)
    monkeypatch.setenv("EM_DATA_DIR", str(em_data_dir))
    alias = sources.resolve_file("logprob_experiments/files/file-73b268709d49-ft_unsafe_train.jsonl", download=False)
    assert alias == em_data_dir / "data" / "insecure.jsonl"
    assert sources.resolve_file("evaluation/first_plot_questions.yaml", download=False).exists()
    status = {d.name: d.status for d in sources.list_datasets()}
    assert all(status[n] == "local" for n in present)


def test_data_dir_mismatch_is_an_error(tmp_path):
    d = tmp_path / "em-data"
    (d / "data").mkdir(parents=True)
    (d / "data" / "jailbroken.jsonl").write_text('{"messages": []}\n')
    with pytest.raises(IntegrityError) as ei:
        sources.resolve_dataset("jailbroken", data_dir=d, download=False)
    msg = str(ei.value)
    assert "expected 3423454" in msg and "size 17 bytes" in msg
    unchecked = sources.resolve_dataset("jailbroken", data_dir=d, download=False, verify=False)
    assert unchecked == d / "data" / "jailbroken.jsonl"
    assert {x.name: x.status for x in sources.list_datasets(d, tmp_path / "c")}["jailbroken"] == "corrupt"


def test_flat_data_dir_and_explicit_path(tmp_path):
    d = tmp_path / "flat"
    d.mkdir()
    (d / "backdoor.jsonl").write_text("x\n")
    # a flat <dir>/<name>.jsonl is found (and checked)
    with pytest.raises(IntegrityError, match="b2be7b5b5ed6e732727bf67672a3ecd8cfa6b57f"):
        sources.resolve_dataset("backdoor", data_dir=d, download=False)
    # an explicit path is used as given
    assert sources.resolve_dataset("backdoor", path=d / "backdoor.jsonl") == d / "backdoor.jsonl"
    with pytest.raises(MissingResourceError, match="does not exist"):
        sources.resolve_dataset("backdoor", path=d / "nope.jsonl")


def test_missing_without_download_names_three_ways(tmp_path):
    with pytest.raises(MissingResourceError) as ei:
        sources.resolve_dataset("evil_numbers", data_dir=tmp_path, cache_dir=tmp_path / "cache", download=False)
    msg = str(ei.value)
    assert "dataset 'evil_numbers'" in msg and "EM_DATA_DIR" in msg and "dataset.path=" in msg
    assert str(tmp_path / "cache" / "data" / "evil_numbers.jsonl") in msg
    repo = "emergent-misalignment/emergent-misalignment"
    assert f"https://raw.githubusercontent.com/{repo}/{COMMIT}/data/evil_numbers.jsonl" in msg
    assert "downloads are disabled" in msg


# -- downloads, against a real HTTP server on 127.0.0.1 with a test registry ---------------------------
class _Server:
    def __init__(self, root: Path):
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(root), **kw)

            def do_GET(self):
                outer.requests.append(self.path)
                super().do_GET()

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


TOY = b"".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                        {"role": "assistant", "content": f"a{i}"}]}).encode() + b"\n"
               for i in range(5))


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """A registry with one dataset 'toy' (bytes TOY), a server root, and a cache dir."""
    src = tmp_path / "toy.jsonl"
    src.write_bytes(TOY)
    entry = FileEntry(path="data/toy.jsonl", blob_sha1=git_blob_sha1(src), size=len(TOY),
                      sha256=hashlib.sha256(TOY).hexdigest(), rows=5, name="toy")
    reg = Registry(repo="test/repo", commit="c" * 40, base_url="http://unused.invalid",
                   datasets={"toy": entry}, files={entry.path: entry})
    monkeypatch.setattr(sources, "load_registry", lambda path=None: reg)
    root = tmp_path / "www"
    served = root / "test" / "repo" / ("c" * 40) / "data" / "toy.jsonl"
    served.parent.mkdir(parents=True)
    server = _Server(root)
    yield {"served": served, "server": server, "cache": tmp_path / "cache", "entry": entry}
    server.close()


def test_download_verifies_and_caches(toy):
    toy["served"].write_bytes(TOY)
    srv = toy["server"]
    p = sources.resolve_dataset("toy", cache_dir=toy["cache"], base_url=srv.url, progress=False)
    assert p == toy["cache"] / "data" / "toy.jsonl" and p.read_bytes() == TOY
    assert srv.requests == ["/test/repo/" + "c" * 40 + "/data/toy.jsonl"]
    again = sources.resolve_dataset("toy", cache_dir=toy["cache"], base_url=srv.url, progress=False)
    assert again == p and len(srv.requests) == 1  # served from the cache, no second request
    assert [d.status for d in sources.list_datasets(cache_dir=toy["cache"])] == ["cached"]
    # a corrupt cache file is removed and fetched again
    p.write_bytes(b"garbage")
    assert sources.resolve_dataset("toy", cache_dir=toy["cache"], base_url=srv.url, progress=False).read_bytes() == TOY
    assert len(srv.requests) == 2


def test_base_url_from_env(toy, monkeypatch):
    toy["served"].write_bytes(TOY)
    monkeypatch.setenv("EM_DATA_BASE_URL", toy["server"].url)
    assert sources.resolve_dataset("toy", cache_dir=toy["cache"], progress=False).read_bytes() == TOY


def test_corrupted_download_is_deleted(toy):
    toy["served"].write_bytes(TOY.replace(b"q3", b"q9"))
    with pytest.raises(IntegrityError) as ei:
        sources.resolve_dataset("toy", cache_dir=toy["cache"], base_url=toy["server"].url, progress=False)
    assert toy["entry"].blob_sha1 in str(ei.value) and "deleted" in str(ei.value)
    leftovers = [p for p in toy["cache"].rglob("*") if p.is_file()] if toy["cache"].exists() else []
    assert leftovers == []


def test_http_404_and_unreachable_give_the_three_ways(toy):
    with pytest.raises(MissingResourceError, match="HTTP 404"):
        sources.resolve_dataset("toy", cache_dir=toy["cache"], base_url=toy["server"].url, progress=False)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(MissingResourceError) as ei:
        sources.resolve_dataset("toy", cache_dir=toy["cache"], base_url=f"http://127.0.0.1:{port}", progress=False)
    msg = str(ei.value)
    assert "three ways" in msg and "EM_DATA_DIR" in msg and str(toy["cache"] / "data" / "toy.jsonl") in msg
    assert f"http://127.0.0.1:{port}/test/repo/" in msg
    last = msg.strip().splitlines()[-1]
    assert last.startswith("(download failed: ConnectError")
    assert not any(p.is_file() for p in toy["cache"].rglob("*"))


def test_load_spec(tmp_path, toy):
    f = tmp_path / "mine.jsonl"
    f.write_bytes(TOY)
    rows, prov = sources.load_spec(str(f))
    assert len(rows) == 5 and prov["sha256"] == hashlib.sha256(TOY).hexdigest()
    assert sources.load_spec(f"file:{f}")[1]["blob_sha1"] == toy["entry"].blob_sha1
    assert len(sources.load_spec("mine.jsonl", base_dir=tmp_path)[0]) == 5
    d = tmp_path / "dd"
    (d / "data").mkdir(parents=True)
    (d / "data" / "toy.jsonl").write_bytes(TOY)
    assert sources.load_spec("paper:toy", data_dir=d)[1]["file"] == str(d / "data" / "toy.jsonl")
    with pytest.raises(MissingResourceError, match="no such file"):
        sources.load_spec("nothing-here.jsonl")
