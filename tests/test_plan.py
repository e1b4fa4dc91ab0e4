"""Strategies and plans: immutable, hashable, readable, validated; pattern matching; per-segment defaults."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest
import torch
from conftest import opaque

import madfunc as mf
from madfunc.plan import parse_strategy

pytestmark = pytest.mark.usefixtures("one_thread")

STRATEGIES = [
    mf.Reverse(),
    mf.Exact(),
    mf.Exact(chunk_size=8),
    mf.Random(),
    mf.Random(k=16, distribution="rademacher"),
    mf.Random(k=2, distribution="orthogonal"),
    mf.SPSA(),
    mf.SPSA(k=4, eps=1e-4, distribution="rademacher", seeding="lazy"),
]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=repr)
def test_strategy_is_frozen(strategy: mf.Strategy) -> None:
    for field in dataclasses.fields(strategy):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(strategy, field.name, 3)
    with pytest.raises((dataclasses.FrozenInstanceError, AttributeError)):
        strategy.new_attribute = 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=repr)
def test_strategy_repr_round_trips(strategy: mf.Strategy) -> None:
    text = repr(strategy)
    assert text.startswith(type(strategy).__name__ + "(")
    assert eval(text, {**vars(mf)}) == strategy  # noqa: S307 - a readable, complete repr


def test_strategy_reprs_are_readable() -> None:
    assert repr(mf.Reverse()) == "Reverse()"
    assert repr(mf.Exact()) == "Exact(chunk_size=None)"
    assert repr(mf.Exact(chunk_size=4)) == "Exact(chunk_size=4)"
    assert repr(mf.Random()) == "Random(k=1, distribution='gaussian')"
    assert repr(mf.Random(k=16, distribution="rademacher")) == "Random(k=16, distribution='rademacher')"


def test_strategies_hash_and_compare_by_value() -> None:
    assert mf.Random(k=4) == mf.Random(k=4, distribution="gaussian")
    assert hash(mf.Random(k=4)) == hash(mf.Random(k=4, distribution="gaussian"))
    assert mf.Random(k=4) != mf.Random(k=5)
    assert mf.Exact() != mf.Exact(chunk_size=1)
    assert mf.Exact() != mf.Reverse()
    assert len({mf.Exact(), mf.Exact(), mf.Reverse(), mf.Reverse(), mf.Random(k=2), mf.Random(k=2)}) == 3
    assert {mf.Exact(chunk_size=2): "a"}[mf.Exact(chunk_size=2)] == "a"


def test_strategy_kinds() -> None:
    assert not mf.Reverse().is_forward
    assert mf.Exact().is_forward and mf.Random().is_forward
    for strategy in STRATEGIES:
        assert isinstance(strategy, mf.Strategy)


def test_valid_boundaries_construct() -> None:
    assert mf.Random(k=1).k == 1
    assert mf.Exact(chunk_size=1).chunk_size == 1
    for distribution in ("gaussian", "rademacher", "orthogonal"):
        assert mf.Random(distribution=distribution).distribution == distribution


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: mf.Random(k=0), ValueError),
        (lambda: mf.Random(k=2.0), TypeError),
        (lambda: mf.Random(distribution="uniform"), ValueError),
        (lambda: mf.Exact(chunk_size=0), ValueError),
        (lambda: mf.Exact(chunk_size=1.5), TypeError),
    ],
)
def test_strategies_validated_on_construction(make, error) -> None:
    with pytest.raises(error):
        make()


# -- Plan -------------------------------------------------------------------------------------------------
def test_plan_accepts_strings_and_strategies() -> None:
    plan = mf.Plan({"a": "rev", "b": "reverse", "c": "exact", "d": mf.Random(k=3), "e": "EXACT"})
    assert dict(plan) == {
        "a": mf.Reverse(),
        "b": mf.Reverse(),
        "c": mf.Exact(),
        "d": mf.Random(k=3),
        "e": mf.Exact(),
    }
    assert len(plan) == 5 and list(plan) == ["a", "b", "c", "d", "e"]


def test_plan_is_immutable_hashable_and_compares_by_value() -> None:
    plan = mf.Plan({"a": "exact"})
    with pytest.raises(AttributeError, match="Plan is immutable"):
        plan._entries = {}  # type: ignore[misc]
    with pytest.raises(TypeError):
        plan["b"] = mf.Exact()  # type: ignore[index]
    assert plan == mf.Plan({"a": mf.Exact()})
    assert hash(plan) == hash(mf.Plan({"a": mf.Exact()}))
    assert plan != mf.Plan({"a": "rev"})
    assert mf.Plan() == mf.Plan({}) and len(mf.Plan()) == 0
    # Building a Plan does not keep a reference to the caller's dict.
    entries = {"a": "exact"}
    plan = mf.Plan(entries)
    entries["b"] = "rev"
    assert list(plan) == ["a"]


def test_plan_repr() -> None:
    assert repr(mf.Plan({"stem": "exact", "block*": mf.Random(k=4)})) == (
        "Plan({'stem': Exact(chunk_size=None), 'block*': Random(k=4, distribution='gaussian')})"
    )


def test_plan_validates_keys_and_container() -> None:
    with pytest.raises(TypeError, match="keys must be non-empty segment names"):
        mf.Plan({"": "exact"})
    with pytest.raises(TypeError, match="keys must be non-empty segment names"):
        mf.Plan({3: "exact"})
    with pytest.raises(TypeError, match="expected a mapping"):
        mf.Plan([("a", "exact")])


def test_pattern_matching() -> None:
    plan = mf.Plan({"block*": mf.Random(k=2), "layer[0-3]": "exact", "head?": "rev", "stem": "exact"})
    assert plan.lookup("block") == mf.Random(k=2)
    assert plan.lookup("block17") == mf.Random(k=2)
    assert plan.lookup("layer2") == mf.Exact()
    assert plan.lookup("layer4") is None
    assert plan.lookup("head1") == mf.Reverse()
    assert plan.lookup("head") is None and plan.lookup("head12") is None
    assert plan.lookup("stem") == mf.Exact()
    assert plan.lookup("stem2") is None
    assert plan.lookup("Block1") is None  # case-sensitive, like segment names


def test_exact_name_takes_precedence_over_patterns() -> None:
    plan = mf.Plan({"block*": "exact", "*7": "rev", "block7": mf.Random(k=3)})
    assert plan.lookup("block7") == mf.Random(k=3)  # two patterns disagree, but the exact key decides
    with pytest.raises(ValueError, match="several patterns"):
        plan.lookup("block17")


# -- defaults, observed through behaviour ---------------------------------------------------------------
# opaque() has no usable forward-mode rule: a segment containing it fails exactly when it runs forward.
def _dist(w, x):
    return opaque(torch.cdist(x @ w, x))


W = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
X = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
WANT = torch.func.grad(lambda w, x: _dist(w, x).sum())(W, X)


def _grad(seg, plan=None):
    return mf.mixed_grad(lambda w, x: seg(w, x).sum(), plan)(W, X)


def test_fwd_defaults_to_exact_forward() -> None:
    with pytest.raises(mf.ForwardModeError):
        _grad(mf.fwd(_dist, name="d"))
    seg = mf.fwd(lambda w, x: torch.sin(x @ w), name="s")
    want = torch.func.grad(lambda w, x: torch.sin(x @ w).sum())(W, X)
    torch.testing.assert_close(_grad(seg), want, rtol=1e-12, atol=1e-14)  # exact, not an estimate


def test_fwd_strategy_argument_is_its_default() -> None:
    torch.testing.assert_close(_grad(mf.fwd(_dist, name="d", strategy="rev")), WANT)
    torch.testing.assert_close(_grad(mf.fwd(_dist, name="d", strategy=mf.Reverse())), WANT)
    seg = mf.fwd(lambda w, x: torch.sin(x @ w), name="s", strategy=mf.Random(k=1))
    exact = torch.func.grad(lambda w, x: torch.sin(x @ w).sum())(W, X)
    torch.manual_seed(0)
    assert not torch.allclose(_grad(seg), exact)  # a one-tangent estimate, not the gradient


def test_plan_overrides_the_annotation_default() -> None:
    with pytest.raises(mf.ForwardModeError):
        _grad(mf.fwd(_dist, name="d", strategy="rev"), {"d": "exact"})
    with pytest.raises(mf.ForwardModeError):
        _grad(mf.rev(_dist, name="d"), {"d": mf.Exact(chunk_size=2)})
    torch.testing.assert_close(_grad(mf.fwd(_dist, name="d"), {"d": "rev"}), WANT)
    torch.testing.assert_close(_grad(mf.fwd(_dist, name="d"), {"?": "rev"}), WANT)  # via a pattern


def test_rev_defaults_to_reverse() -> None:
    torch.testing.assert_close(_grad(mf.rev(_dist, name="d")), WANT)


def test_unannotated_code_is_reverse_mode() -> None:
    got = mf.mixed_grad(lambda w, x: _dist(w, x).sum())(W, X)
    torch.testing.assert_close(got, WANT)
    # ... also around and between forward segments
    seg = mf.fwd(lambda w, x: torch.sin(x @ w), name="s")
    got = mf.mixed_grad(lambda w, x: torch.cdist(seg(w, x), x).sum())(W, X)
    want = torch.func.grad(lambda w, x: torch.cdist(torch.sin(x @ w), x).sum())(W, X)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_plan_accepts_dict_plan_and_none_in_transforms() -> None:
    seg = mf.fwd(_dist, name="d")
    for plan in ({"d": "rev"}, mf.Plan({"d": "rev"}), {"d": mf.Reverse()}):
        torch.testing.assert_close(_grad(seg, plan), WANT)
        g, value = mf.mixed_grad_and_value(lambda w, x: seg(w, x).sum(), plan)(W, X)
        torch.testing.assert_close(g, WANT)
        torch.testing.assert_close(value, _dist(W, X).sum())


# -- string form, pickling, copying -------------------------------------------------------------------------
# Every kind of strategy and field, and plans with patterns: each row must survive str/parse, pickle and copy.
STRING_FORMS = [
    ("rev", mf.Reverse()),
    ("exact", mf.Exact()),
    ("exact:8", mf.Exact(chunk_size=8)),
    ("random:1:gaussian", mf.Random()),
    ("random:16:rademacher", mf.Random(k=16, distribution="rademacher")),
    ("random:2:orthogonal", mf.Random(k=2, distribution="orthogonal")),
    ("random:4:rademacher:lazy", mf.Random(k=4, distribution="rademacher", seeding="lazy")),
    ("random:3:gaussian:eager", mf.Random(k=3, seeding="eager")),
    ("spsa:1:0.001:gaussian", mf.SPSA()),
    ("spsa:4:0.0001:rademacher:lazy", mf.SPSA(k=4, eps=1e-4, distribution="rademacher", seeding="lazy")),
    ("spsa:2:0.01:gaussian:eager:mean", mf.SPSA(k=2, eps=1e-2, seeding="eager", primal="mean")),
]
PLANS = [
    mf.Plan(),
    mf.Plan({"features": mf.Random(k=16, distribution="rademacher"), "head": mf.Reverse()}),
    mf.Plan({"block*": mf.Exact(chunk_size=64), "layer[0-3]": "rev", "head?": mf.Random(k=2, seeding="lazy")}),
    mf.Plan({"stem": "exact", "*": mf.Random(k=1, distribution="orthogonal", seeding="eager")}),
    mf.Plan({"enc.layer 1": mf.Random(k=5, seeding="eager")}),
    mf.Plan({name: strategy for name, (_, strategy) in zip("abcdefghijk", STRING_FORMS, strict=True)}),
]


@pytest.mark.parametrize(("text", "strategy"), STRING_FORMS, ids=[t for t, _ in STRING_FORMS])
def test_strategy_string_form_round_trips(text: str, strategy: mf.Strategy) -> None:
    assert str(strategy) == strategy.to_string() == text
    assert parse_strategy(text) == strategy
    assert parse_strategy(f"  {text.upper()} ") == strategy  # case and surrounding spaces are ignored


@pytest.mark.parametrize(
    ("text", "strategy"),
    [
        ("reverse", mf.Reverse()),
        ("random", mf.Random()),
        ("random:7", mf.Random(k=7)),
        ("Random: 2 : Orthogonal", mf.Random(k=2, distribution="orthogonal")),
        ("random:4:gaussian:auto", mf.Random(k=4)),
        ("exact:08", mf.Exact(chunk_size=8)),
    ],
)
def test_parse_strategy_fills_defaults(text: str, strategy: mf.Strategy) -> None:
    assert parse_strategy(text) == strategy


@pytest.mark.parametrize("plan", PLANS, ids=str)
def test_plan_string_form_round_trips(plan: mf.Plan) -> None:
    text = str(plan)
    assert text == plan.to_string()
    assert mf.Plan.from_string(text) == plan
    assert list(mf.Plan.from_string(text)) == list(plan)  # order kept
    assert str(mf.Plan.from_string(text)) == text


def test_plan_string_form_text() -> None:
    assert str(PLANS[1]) == "features=random:16:rademacher,head=rev"
    assert str(PLANS[2]) == "block*=exact:64,layer[0-3]=rev,head?=random:2:gaussian:lazy"
    assert str(mf.Plan()) == ""
    assert mf.Plan.from_string("") == mf.Plan.from_string("   ") == mf.Plan()
    assert mf.Plan.from_string(" features = exact:8 , head=reverse") == mf.Plan(
        {"features": mf.Exact(chunk_size=8), "head": mf.Reverse()}
    )


@pytest.mark.parametrize("value", [*(s for _, s in STRING_FORMS), *PLANS], ids=str)
def test_pickles_and_copies(value: mf.Strategy | mf.Plan) -> None:
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        restored = pickle.loads(pickle.dumps(value, protocol=protocol))
        assert restored == value and type(restored) is type(value)
        assert hash(restored) == hash(value)
    assert copy.deepcopy(value) == value and copy.copy(value) == value
    if isinstance(value, mf.Plan):
        assert dict(copy.deepcopy(value)) == dict(value)
        with pytest.raises(AttributeError, match="Plan is immutable"):
            copy.deepcopy(value)._entries = {}  # type: ignore[misc]


# The built-in kinds first, in order; then any others registered in this process (frog, and strategies that
# tests define in their own files: the syntax is generated from the registered classes).
SYNTAX = (
    r"rev \| reverse \| exact\[:CHUNK\] \| random\[:K\[:DISTRIBUTION\[:SEEDING\]\]\] "
    r"\| activity\[:K\[:DISTRIBUTION\[:SEEDING\[:BATCH_DIM\]\]\]\](?: \| [a-z_]+[^ ]*)*\."
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "features",
            r"^plan entry 'features': expected SEGMENT=STRATEGY, e\.g\. "
            r"'features=random:16:rademacher,head=rev', with STRATEGY one of " + SYNTAX + "$",
        ),
        ("a=rev,", r"^plan entry '': expected SEGMENT=STRATEGY"),
        ("=rev", r"^plan entry '=rev': missing the segment name before '='\.$"),
        ("a=rev,a=exact", r"^plan entry 'a=exact': segment 'a' is given twice\.$"),
        ("a=rev, a =rev", r"^plan entry 'a =rev': segment 'a' is given twice\.$"),
        ("head=backprop", r"^segment 'head': unknown strategy 'backprop'; valid strategies: " + SYNTAX + "$"),
        ("head=", r"^segment 'head': unknown strategy ''; valid strategies: " + SYNTAX + "$"),
        ("a=b=rev", r"^segment 'a': unknown strategy 'b=rev'; valid strategies: "),
        ("features=random:0", r"^segment 'features': random:K: K must be an integer >= 1, got '0'\.$"),
        ("features=random:x", r"^segment 'features': random:K: K must be an integer >= 1, got 'x'\.$"),
        ("features=random:²", r"^segment 'features': random:K: K must be an integer >= 1, got '²'\.$"),
        ("features=exact:0", r"^segment 'features': exact:CHUNK: CHUNK must be an integer >= 1, got '0'\.$"),
        ("features=exact:-2", r"^segment 'features': exact:CHUNK: CHUNK must be an integer >= 1, got '-2'\.$"),
        (
            "features=random:4:uniform",
            r"^segment 'features': unknown distribution 'uniform'; valid distributions: "
            r"gaussian, rademacher, orthogonal\.$",
        ),
        (
            "features=random:4:gaussian:2",
            r"^segment 'features': unknown seeding '2'; valid seedings: auto, lazy, eager, kept\.$",
        ),
        (
            "features=random:4:gaussian:lazy:2",
            r"^segment 'features': too many ':' fields in 'random:4:gaussian:lazy:2'; valid strategies: " + SYNTAX,
        ),
        ("head=rev:2", r"^segment 'head': too many ':' fields in 'rev:2'; valid strategies: " + SYNTAX + "$"),
        ("head=exact:1:2", r"^segment 'head': too many ':' fields in 'exact:1:2'; valid strategies: "),
    ],
)
def test_plan_from_string_rejects_bad_input(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mf.Plan.from_string(text)


def test_parse_strategy_errors_name_the_caller() -> None:
    with pytest.raises(ValueError, match=r"^parse_strategy: unknown strategy 'fwd'; valid strategies: " + SYNTAX):
        parse_strategy("fwd")
    with pytest.raises(ValueError, match=r"^fwd\(strategy=\.\.\.\): random:K: K must be"):
        parse_strategy("random:0", where="fwd(strategy=...)")
    with pytest.raises(TypeError, match=r"^parse_strategy: expected a str, got int 3\.$"):
        parse_strategy(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^Plan\.from_string: expected a str, got dict \{\}\.$"):
        mf.Plan.from_string({})  # type: ignore[arg-type]


@pytest.mark.parametrize("key", ["a,b", "a=b", " a", "a "])
def test_plan_rejects_keys_its_string_form_cannot_hold(key: str) -> None:
    with pytest.raises(ValueError, match=rf"^Plan\(\.\.\.\): key {key!r} cannot be written in a plan string"):
        mf.Plan({key: "rev"})
