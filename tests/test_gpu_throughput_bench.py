"""benchmarks/gpu_throughput.py composes on a CPU (--dry-run); its FLOP count matches the model it builds."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_throughput.py"


def _module():
    sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("gpu_throughput", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_flops_per_token_counts_every_projection_of_the_built_model():
    import torch

    mod = _module()
    for arch in (mod.DRY_ARCH, dict(mod.DRY_ARCH, num_key_value_heads=4, tie_word_embeddings=False)):
        model = mod.build_model(arch, "sdpa", "cpu", torch.float32)
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        assert mod.flops_per_token(arch, 0.0) == 4 * linear
        d, layers = arch["hidden_size"], arch["num_hidden_layers"]
        assert mod.flops_per_token(arch, 10.0) - mod.flops_per_token(arch, 0.0) == 12 * layers * d * 10.0


def test_real_architectures_have_their_published_sizes():
    mod = _module()
    import torch

    with torch.device("meta"):
        sizes = {m: sum(p.numel() for p in mod.build_model(a, "sdpa", "meta", torch.bfloat16).parameters())
                 for m, a in mod.ARCHS.items()}
    assert 0.45e9 < sizes["qwen2.5-0.5b"] < 0.52e9
    assert 1.5e9 < sizes["qwen2.5-1.5b"] < 1.6e9
    assert 7.5e9 < sizes["qwen2.5-7b"] < 7.7e9


@pytest.mark.slow
def test_dry_run_composes_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    p = subprocess.run([sys.executable, str(BENCH), "--dry-run", "--json", str(out)], capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for field in ("| model | config | trained tok/s", "em sdpa", "em sdpa gc", "em sdpa plain-ce", "skipped:"):
        assert field in p.stdout, field
    if importlib.util.find_spec("trl"):
        assert "trl sdpa" in p.stdout
    assert "!!" not in p.stderr
