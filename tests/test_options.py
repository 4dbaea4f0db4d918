"""Options: how adapters declare and validate their URL query knobs."""

from __future__ import annotations

from typing import Any

import pytest

from unibus import InvalidURL, make_url
from unibus.options import Option, Options, parse_bool, parse_int, parse_seconds

SECRET = "s3cr3t-Tok3n"

OPTIONS = Options(
    Option("prefetch", int, 64, "default prefetch", minimum=1),
    Option("queue_type", str, "quorum", "queue kind", choices=("quorum", "classic")),
    Option("heartbeat", float, 10.0, "seconds between heartbeats", minimum=1),
    Option("confirm", bool, True, "publisher confirms"),
    Option("client_id", str, None, "client name"),
    Option("sasl_password", str, None, "SASL password", secret=True),
    Option("pin", int, None, "a secret number", secret=True, minimum=1000),
    Option("mode", str, "a", "a secret choice", secret=True, choices=("a", "b")),
)


def parse(query: str) -> dict[str, Any]:
    return OPTIONS.parse(make_url(f"amqp://h?{query}" if query else "amqp://h"))


def test_absent_options_take_their_defaults() -> None:
    assert parse("") == {"prefetch": 64, "queue_type": "quorum", "heartbeat": 10.0,
                         "confirm": True, "client_id": None, "sasl_password": None,
                         "pin": None, "mode": "a"}


def test_given_options_are_parsed_to_their_types() -> None:
    values = parse("prefetch=8&queue_type=classic&heartbeat=2500ms&confirm=no&client_id=svc")

    assert values["prefetch"] == 8
    assert values["queue_type"] == "classic"
    assert values["heartbeat"] == pytest.approx(2.5)
    assert values["confirm"] is False
    assert values["client_id"] == "svc"


def test_unknown_option_is_invalid_and_named_with_a_did_you_mean() -> None:
    with pytest.raises(InvalidURL) as caught:
        parse("prefech=8")

    message = str(caught.value)
    assert "'prefech'" in message
    assert "Did you mean 'prefetch'?" in message
    assert "amqp://" in message


def test_unknown_option_without_a_close_match_lists_the_known_ones() -> None:
    with pytest.raises(InvalidURL) as caught:
        parse("zzz=1")

    message = str(caught.value)
    assert "'zzz'" in message
    assert "Did you mean" not in message
    assert "Known options: client_id, confirm, heartbeat" in message


def test_unknown_option_of_an_adapter_without_options_says_so() -> None:
    with pytest.raises(InvalidURL, match=r"'x'.*Known options: none"):
        Options().parse(make_url("memory://?x=1"))


def test_unknown_option_error_does_not_echo_its_value() -> None:
    with pytest.raises(InvalidURL) as caught:
        parse(f"sasl_pasword={SECRET}")

    assert SECRET not in str(caught.value)
    assert "Did you mean 'sasl_password'?" in str(caught.value)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("prefetch=many", r"option prefetch='many': expected an integer"),
        ("prefetch=1.5", r"option prefetch='1\.5': expected an integer"),
        ("confirm=maybe", r"option confirm='maybe': expected true or false"),
        ("heartbeat=soon", r"option heartbeat='soon': expected a non-negative number"),
        ("heartbeat=-1", r"option heartbeat='-1': expected a non-negative number"),
        ("heartbeat=inf", r"option heartbeat='inf': expected a non-negative number"),
        ("heartbeat=nan", r"option heartbeat='nan': expected a non-negative number"),
    ],
)
def test_value_of_the_wrong_type_is_invalid_and_named(query: str, expected: str) -> None:
    with pytest.raises(InvalidURL, match=expected):
        parse(query)


def test_value_outside_the_choices_is_invalid_and_lists_them() -> None:
    with pytest.raises(InvalidURL, match=r"option queue_type='stream': must be one of quorum, "
                                         r"classic"):
        parse("queue_type=stream")


@pytest.mark.parametrize(
    ("query", "expected"),
    [("prefetch=0", r"prefetch='0': must be at least 1"),
     ("heartbeat=0.5", r"heartbeat='0\.5': must be at least 1")],
)
def test_value_below_the_minimum_is_invalid(query: str, expected: str) -> None:
    with pytest.raises(InvalidURL, match=expected):
        parse(query)


def test_value_at_the_minimum_is_valid() -> None:
    assert parse("prefetch=1")["prefetch"] == 1


@pytest.mark.parametrize(
    "query",
    [f"pin={SECRET}", "pin=12", f"mode={SECRET}", f"pin=1{SECRET}"],
)
def test_invalid_secret_values_are_never_echoed(query: str) -> None:
    raw = query.partition("=")[2]
    with pytest.raises(InvalidURL) as caught:
        parse(query)

    message = str(caught.value)
    assert raw not in message
    assert "***" in message
    assert query.partition("=")[0] in message


def test_valid_secret_value_is_parsed() -> None:
    assert parse(f"sasl_password={SECRET}")["sasl_password"] == SECRET


def test_options_declared_twice_are_refused() -> None:
    with pytest.raises(ValueError, match="'a' is declared twice"):
        Options(Option("a", int, 1, "one"), Option("a", str, "x", "two"))


def test_options_iterate_in_declaration_order() -> None:
    assert [o.name for o in OPTIONS][:3] == ["prefetch", "queue_type", "heartbeat"]


def test_markdown_lists_every_option() -> None:
    table = OPTIONS.markdown()

    for option in OPTIONS:
        assert f"| `{option.name}` | {option.kind.__name__} |" in table


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1", True), ("true", True), ("Yes", True), (" on ", True),
     ("0", False), ("FALSE", False), ("no", False), ("off", False)],
)
def test_parse_bool_accepts_the_usual_spellings(text: str, expected: bool) -> None:
    assert parse_bool(text) is expected


@pytest.mark.parametrize("text", ["", "2", "y", "truthy"])
def test_parse_bool_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError):
        parse_bool(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2.5", 2.5), ("2.5s", 2.5), ("250ms", 0.25), ("0", 0.0), ("1e3ms", 1.0), (" 3 ", 3.0)],
)
def test_parse_seconds_accepts_seconds_and_milliseconds(text: str, expected: float) -> None:
    assert parse_seconds(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "s", "ms", "-1", "-5ms", "inf", "nan", "1ss", "1h", "x"])
def test_parse_seconds_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError, match="non-negative number of seconds"):
        parse_seconds(text)


def test_parse_int_refuses_non_integers_with_a_plain_message() -> None:
    assert parse_int("42") == 42
    with pytest.raises(ValueError, match=r"expected an integer, got '4\.2'"):
        parse_int("4.2")
