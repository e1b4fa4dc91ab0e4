"""The documentation's examples run as written, and the site covers the public API.

Every ```python block of a page under docs/ runs, in order, in one namespace per page (so a page's later
blocks may use its earlier ones); ```pycon blocks run as doctests. The site itself is built by
``python -m mkdocs build --strict`` in CI, which fails on broken links, anchors or docstrings.
"""

from __future__ import annotations

import doctest
import pathlib
import re
import sys
import types

import pytest
import torch

import madfunc as mf

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.parts)
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.S | re.M)


def blocks(page: pathlib.Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(page.read_text()) if lang == language]


def run_page(page: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Run a page's python blocks in one namespace and its pycon blocks as doctests; return the namespace.

    The namespace is a module's, registered while the page runs (Dynamo looks a compiled function's globals
    up by module name)."""
    name = "docs_page_" + re.sub(r"\W", "_", page.relative_to(DOCS).as_posix())
    module = types.ModuleType(name)
    monkeypatch.setitem(sys.modules, name, module)
    namespace = module.__dict__
    for block in blocks(page, "python"):
        exec(compile(block, str(page), "exec"), namespace)
    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for i, block in enumerate(blocks(page, "pycon")):
        test = parser.get_doctest(block, namespace, f"{page.name}[{i}]", str(page), 0)
        runner.run(test, clear_globs=False)
        namespace = test.globs
    assert runner.failures == 0, f"{page.name}: {runner.failures} doctest failures (printed above)"
    return namespace


@pytest.fixture
def quick_compile(monkeypatch):
    """torch.compile with the "eager" backend unless a page names one: Dynamo traces the page's code as
    written (``fullgraph=True`` included); inductor's code generation (~10 s a graph on 2 CPU cores) is not
    what a page shows, and tests/test_compile.py covers compiled steps."""
    real = torch.compile

    def compile_(model=None, **kwargs):
        kwargs.setdefault("backend", "eager")
        return real(**kwargs) if model is None else real(model, **kwargs)

    monkeypatch.setattr(torch, "compile", compile_)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def clean_process_group():
    """A page that starts a process group ends it; if it fails half way, end it here."""
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


RUNNABLE = [p for p in PAGES if blocks(p, "python") or blocks(p, "pycon")]


@pytest.mark.usefixtures("one_thread", "quick_compile", "clean_process_group")
@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace:UserWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: str(p.relative_to(DOCS)))
def test_page_examples_run(page: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = torch.get_rng_state()
    try:
        namespace = run_page(page, monkeypatch)
    finally:
        torch.set_rng_state(state)
    if page.name == "getting-started.md":  # what the README's examples were checked for before the move
        exact, reference, params = namespace["exact"], namespace["reference"], namespace["params"]
        for key in params:
            torch.testing.assert_close(exact[key], reference[key], rtol=1e-5, atol=1e-5)
        assert namespace["model"][0].module.weight.grad is not None


def test_the_guides_have_examples() -> None:
    """Each topic page shows code that runs (a page of prose alone would go stale unnoticed)."""
    ran = {p.relative_to(DOCS).as_posix() for p in RUNNABLE}
    for page in ("index.md", "getting-started.md", "concepts.md", "guides/strategies.md", "guides/memory.md",
                 "guides/randomness.md", "guides/ops.md", "guides/distributed.md", "guides/compile.md",
                 "guides/huggingface.md"):
        assert page in ran, page


def _reference_targets() -> list[str]:
    return [target for page in (DOCS / "api").glob("*.md")
            for target in re.findall(r"^::: *(\S+)", page.read_text(), re.M)]


def test_api_reference_covers_the_public_names_only() -> None:
    targets = _reference_targets()
    assert len(targets) == len(set(targets)), "a name documented twice"
    assert sorted(targets) == sorted(f"madfunc.{name}" for name in mf.__all__)


def test_every_page_is_in_the_nav() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    nav = config[config.index("\nnav:"):]
    listed = re.findall(r":\s*(\S+\.md)\s*$", nav, re.M)
    assert sorted(listed) == sorted(p.relative_to(DOCS).as_posix() for p in PAGES)
