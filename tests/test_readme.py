"""The README's example runs as written, its set-up commands match CI, and its links lead somewhere.

The guides' examples moved to docs/ and are run by tests/test_docs.py."""

import doctest
import pathlib
import re

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.S | re.M)


def _blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(README.read_text()) if lang == language]


def _run_examples() -> dict:
    """Run the README's doctests in order, in one namespace (the later ones use the first's imports and data);
    return that namespace."""
    examples = _blocks("pycon")
    assert len(examples) == 3, "the README has three examples: the plan, fine-tuning, and writing a strategy"
    assert not _blocks("python"), "the README's examples are doctests (```pycon); longer ones belong in docs/"
    globs: dict = {}
    for i, example in enumerate(examples):
        test = doctest.DocTestParser().get_doctest(example, globs, f"README[{i}]", str(README), 0)
        runner = doctest.DocTestRunner()
        runner.run(test, clear_globs=False)
        assert runner.failures == 0, f"the README's example {i} printed something else (see above)"
        globs = test.globs
    return globs


def test_readme_example_runs_and_is_exact():
    globs = _run_examples()
    exact, reference, params = globs["exact"], globs["reference"], globs["params"]
    for key in params:
        torch.testing.assert_close(exact[key], reference[key], rtol=1e-5, atol=1e-5)
    # The strategy written in the README: unbiased, its law (n/k - 1) read by compare, its string form parsed.
    coordinates, layer = globs["Coordinates"], globs["layer"]
    assert globs["mf"].Plan.from_string("layer=coordinates:3")["layer"] == coordinates(k=3)
    report = globs["mf"].compare(lambda p, x: layer(p, x).sum(), {"layer": coordinates(k=2)},
                                 dict(layer.module.named_parameters()), torch.ones(4, 3), draws=4)
    assert report.variance_theory == 8 / 2 - 1


def test_readme_names_the_test_command():
    assert "python -m pytest" in README.read_text()


def test_readme_set_up_commands_match_ci():
    """One command installs the demo extra and runs the demo, the other the dev extra and the tests, with
    the PyTorch version that .ci/run installs."""
    commands = [line for block in _blocks("bash") for line in block.splitlines() if "pip install" in line]
    demo = [c for c in commands if '".[demo]"' in c]
    dev = [c for c in commands if '".[dev]"' in c]
    assert len(demo) == 1 and demo[0].rstrip().endswith("python -m madfunc demo")
    assert len(dev) == 1 and dev[0].rstrip().endswith("python -m pytest")
    pinned = re.search(r"pip install[^\n]*\b(torch==[\w.+]+)", (ROOT / ".ci" / "run").read_text())
    assert pinned is not None and pinned.group(1) in dev[0]


def test_readme_links_lead_to_files():
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text()):
        if "://" not in target:
            assert (ROOT / target).exists(), target


def test_readme_stays_short():
    # One screen per section: the pitch, an example, the planner, fine-tuning, writing a strategy, set-up, docs.
    assert len(README.read_text().splitlines()) <= 165
