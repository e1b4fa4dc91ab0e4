"""The README's examples run as written, and what they claim holds."""

import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_examples_run_and_are_exact(capsys):
    namespace: dict = {}
    blocks = _blocks()
    assert len(blocks) >= 2
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    exact, reference, params = namespace["exact"], namespace["reference"], namespace["params"]
    for key in params:
        torch.testing.assert_close(exact[key], reference[key], rtol=1e-5, atol=1e-5)
    assert namespace["model"][0].module.weight.grad is not None


def test_readme_names_the_test_command():
    assert "pytest" in README.read_text()
