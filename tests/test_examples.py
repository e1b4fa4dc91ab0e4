"""The example scripts run end to end at their smallest settings."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_hf_finetune_smoke():
    script = os.path.join(ROOT, "examples", "hf_finetune.py")
    out = subprocess.run([sys.executable, script, "--smoke", "--no-progress"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    number = r"\s+\d+\.\d+"
    for method in (r"fwd Random\(k=2\)", "backprop"):  # a table row each: 4 losses, ms/step, peak MB
        assert re.search(rf"^{method}{number * 6}\s*$", out.stdout, re.MULTILINE), out.stdout
    assert "peak MB: " in out.stdout and "ms/step: " in out.stdout
