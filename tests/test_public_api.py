"""The public surface: every name in ``madfunc.__all__`` imports and is documented."""

from __future__ import annotations

import importlib
import inspect

import pytest

import madfunc

PUBLIC = sorted(madfunc.__all__)


def test_all_is_unique_sorted_and_public() -> None:
    assert len(set(madfunc.__all__)) == len(madfunc.__all__)
    assert list(madfunc.__all__) == sorted(madfunc.__all__)
    assert all(not name.startswith("_") for name in madfunc.__all__)


def test_issue_names_are_public() -> None:
    required = {
        "fwd",
        "rev",
        "Reverse",
        "Exact",
        "Random",
        "SPSA",
        "Plan",
        "mixed_grad",
        "mixed_grad_and_value",
        "use_plan",
        "ForwardModeError",
    }
    assert required <= set(madfunc.__all__)


def test_no_public_name_missing_from_all() -> None:
    """Names a user sees in ``dir(madfunc)`` that are not modules or dunders are all in ``__all__``."""
    visible = {
        name
        for name, value in vars(madfunc).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert visible <= set(madfunc.__all__), visible - set(madfunc.__all__)


@pytest.mark.parametrize("name", PUBLIC)
def test_name_imports(name: str) -> None:
    module = importlib.import_module("madfunc")
    assert getattr(module, name) is getattr(madfunc, name)
    exec(f"from madfunc import {name}", {})  # noqa: S102


@pytest.mark.parametrize("name", PUBLIC)
def test_name_has_a_docstring(name: str) -> None:
    doc = inspect.getdoc(getattr(madfunc, name))
    assert doc and len(doc.split()) >= 5, f"madfunc.{name} needs a docstring"


FUNCTIONS = [name for name in PUBLIC if inspect.isfunction(getattr(madfunc, name))]


def test_there_are_public_functions() -> None:
    assert set(FUNCTIONS) >= {"fwd", "rev", "mixed_grad", "mixed_grad_and_value", "use_plan"}


@pytest.mark.parametrize("name", FUNCTIONS)
def test_public_function_documents_args_returns_and_examples(name: str) -> None:
    doc = inspect.getdoc(getattr(madfunc, name))
    assert "Examples:" in doc and ">>> " in doc.split("Examples:", 1)[1]
    assert "Args:" in doc
    signature = inspect.signature(getattr(madfunc, name))
    documented = doc.split("Args:", 1)[1]
    for parameter in signature.parameters.values():
        assert f"{parameter.name}:" in documented, f"madfunc.{name}: argument {parameter.name} undocumented"
    assert "Default:" in documented


@pytest.mark.parametrize("name", ["Reverse", "Exact", "Random", "Plan"])
def test_configuration_classes_have_examples(name: str) -> None:
    doc = inspect.getdoc(getattr(madfunc, name))
    assert "Examples:" in doc and ">>> " in doc


def test_transforms_follow_torch_func_signatures() -> None:
    """``(fn, plan=None, argnums=0, has_aux=False)``: torch.func.grad's order, with the plan second."""
    for name in ("mixed_grad", "mixed_grad_and_value"):
        parameters = inspect.signature(getattr(madfunc, name)).parameters
        assert list(parameters)[:4] == ["fn", "plan", "argnums", "has_aux"]
        assert parameters["plan"].default is None
        assert parameters["argnums"].default == 0
        assert parameters["has_aux"].default is False


def test_version() -> None:
    assert isinstance(madfunc.__version__, str) and madfunc.__version__.count(".") >= 1
