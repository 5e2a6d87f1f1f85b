"""Nothing from a model directory is executed unless the user asks (model.trust_remote_code, off by default)."""

from __future__ import annotations

import json
import shutil

from em.errors import EMError
from em.models.loading import ModelArgs, load_model
from em.models.tiny import TinySpec, materialize_tiny


def test_custom_code_in_a_model_dir_is_never_run_by_default(tmp_path):
    d = tmp_path / "model"
    shutil.copytree(materialize_tiny(TinySpec()), d)
    marker = tmp_path / "executed"
    (d / "evil_modeling.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil_modeling.EvilForCausalLM"}  # asks for its own code
    (d / "config.json").write_text(json.dumps(cfg))
    args = ModelArgs(name="evil", name_or_path=str(d))
    assert args.trust_remote_code is False
    try:
        load_model(args, str(d))
    except (EMError, ValueError, OSError):
        pass  # refusing is fine; running it is not
    assert not marker.exists()
