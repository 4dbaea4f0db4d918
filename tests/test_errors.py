"""The error tree: one root, builtins where handlers expect them, drawn in the docstring."""

from __future__ import annotations

import builtins
import pickle
import re

import pytest

import unibus
from unibus import errors
from unibus.errors import PublishFailed, UnibusError

ERRORS: list[type[UnibusError]] = [getattr(errors, name) for name in errors.__all__]

#: error → the builtin exceptions generic handlers may catch it as.
BUILTIN_BASES: dict[type[UnibusError], tuple[type[Exception], ...]] = {
    errors.InvalidURL: (ValueError,),
    errors.UnknownScheme: (ValueError,),
    errors.AdapterNotInstalled: (ImportError,),
    errors.InvalidName: (ValueError,),
    errors.InvalidMessage: (TypeError,),
    errors.MessageTooLarge: (TypeError, ValueError),
    errors.DecodeError: (ValueError,),
    errors.BrokerUnavailable: (ConnectionError,),
}


def drawn_tree() -> dict[str, tuple[str, str | None]]:
    """Parse the tree in the errors docstring: name → (drawn parent, drawn builtin base)."""
    lines = (errors.__doc__ or "").splitlines()
    root = next(i for i, line in enumerate(lines) if line.strip() == "UnibusError")
    margin = len(lines[root]) - len(lines[root].lstrip())
    tree: dict[str, tuple[str, str | None]] = {}
    stack = ["UnibusError"]
    for line in lines[root + 1:]:
        match = re.match(r"(?P<indent>(?:[│ ]   )*)[├└]── (?P<name>\w+)(?: \((?P<base>\w+)\))?",
                         line[margin:])
        if match is None:
            continue
        depth = len(match["indent"]) // 4 + 1
        del stack[depth:]
        tree[match["name"]] = (stack[-1], match["base"])
        stack.append(match["name"])
    return tree


def test_every_error_derives_from_unibus_error() -> None:
    for error in ERRORS:
        assert issubclass(error, UnibusError), error


def test_every_error_is_exported_by_unibus() -> None:
    for error in ERRORS:
        assert getattr(unibus, error.__name__) is error


@pytest.mark.parametrize(("error", "bases"), list(BUILTIN_BASES.items()),
                         ids=[e.__name__ for e in BUILTIN_BASES])
def test_error_is_catchable_as_the_builtin_generic_handlers_expect(
        error: type[UnibusError], bases: tuple[type[Exception], ...]) -> None:
    with pytest.raises(bases):
        raise error("boom")
    for base in bases:
        assert issubclass(error, base)


@pytest.mark.parametrize(
    "error", [errors.BrokerUnavailable, errors.AuthenticationFailed, errors.BrokerTimeout,
              errors.PublishFailed])
def test_broker_side_failures_are_broker_errors(error: type[UnibusError]) -> None:
    assert issubclass(error, errors.BrokerError)


def test_no_error_shadows_a_builtin_name() -> None:
    for error in ERRORS:
        assert not hasattr(builtins, error.__name__), error


def test_docstring_tree_draws_every_error() -> None:
    assert set(drawn_tree()) == {e.__name__ for e in ERRORS} - {"UnibusError"}


def test_docstring_tree_draws_the_real_parents_and_builtin_bases() -> None:
    for name, (parent, builtin) in drawn_tree().items():
        error = getattr(errors, name)
        unibus_bases = [b.__name__ for b in error.__bases__ if issubclass(b, UnibusError)]
        other_bases = [b.__name__ for b in error.__bases__ if not issubclass(b, UnibusError)]
        assert unibus_bases == [parent], name
        assert other_bases == ([builtin] if builtin else []), name


def test_publish_failed_carries_the_unconfirmed_ids() -> None:
    error = PublishFailed("2 messages were not confirmed", message_ids=("a", "b"))

    assert error.message_ids == ("a", "b")
    assert str(error) == "2 messages were not confirmed"


@pytest.mark.parametrize("error", ERRORS, ids=[e.__name__ for e in ERRORS])
def test_errors_survive_pickling(error: type[UnibusError]) -> None:
    copy = pickle.loads(pickle.dumps(error("went wrong")))

    assert type(copy) is error
    assert str(copy) == "went wrong"


def test_publish_failed_keeps_its_ids_through_pickling() -> None:
    copy = pickle.loads(pickle.dumps(PublishFailed("lost", message_ids=("a",))))

    assert copy.message_ids == ("a",)
