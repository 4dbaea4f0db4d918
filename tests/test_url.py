"""unibus.URL: parsing, password masking, immutability, equality and round trips."""

from __future__ import annotations

import dataclasses

import pytest

from unibus import URL, InvalidURL, make_url
from unibus.url import HostPort

SECRET = "s3cr3t-Pw"


def test_full_url_parses_into_its_parts() -> None:
    url = make_url("amqp://app:pw@rabbit.local:5672/prod?heartbeat=5&prefetch=10")

    assert url.scheme == "amqp"
    assert url.username == "app"
    assert url.password == "pw"
    assert url.hosts == (HostPort("rabbit.local", 5672),)
    assert (url.host, url.port) == ("rabbit.local", 5672)
    assert url.path == "/prod"
    assert dict(url.query) == {"heartbeat": "5", "prefetch": "10"}


def test_scheme_is_lower_cased() -> None:
    assert make_url("AMQP://h").scheme == "amqp"


def test_multi_host_url_keeps_every_host_in_order() -> None:
    url = make_url("kafka://b1:9092,b2:9093,b3")

    assert url.hosts == (HostPort("b1", 9092), HostPort("b2", 9093), HostPort("b3"))
    assert (url.host, url.port) == ("b1", 9092)
    assert str(url) == "kafka://b1:9092,b2:9093,b3"


@pytest.mark.parametrize(
    ("text", "hosts"),
    [
        ("nats://[::1]:4222", (HostPort("::1", 4222),)),
        ("nats://[::1]", (HostPort("::1"),)),
        ("nats://[fe80::1:2]:1,[::ffff:127.0.0.1]:2",
         (HostPort("fe80::1:2", 1), HostPort("::ffff:127.0.0.1", 2))),
        ("nats://127.0.0.1:4222,[::1]:4223", (HostPort("127.0.0.1", 4222), HostPort("::1", 4223))),
    ],
)
def test_ipv6_hosts_in_brackets_are_parsed_and_rendered_back(
        text: str, hosts: tuple[HostPort, ...]) -> None:
    url = make_url(text)

    assert url.hosts == hosts
    assert str(url) == text


@pytest.mark.parametrize(
    "text",
    ["nats://[::1", "nats://[::g]:1", "nats://[]:1", "nats://[::1]x", "nats://[::1]4222",
     "nats://[fe80::1%25eth0]:1"],
)
def test_malformed_ipv6_host_is_invalid(text: str) -> None:
    with pytest.raises(InvalidURL):
        make_url(text)


def test_url_without_hosts_has_none() -> None:
    url = make_url("memory://")

    assert url.hosts == ()
    assert url.host is None
    assert url.port is None


def test_percent_encoded_credentials_are_decoded() -> None:
    url = make_url("amqp://us%40er:p%40ss%2Fw%3Ard%25%3F%23@h/")

    assert url.username == "us@er"
    assert url.password == "p@ss/w:rd%?#"


def test_password_with_a_raw_at_sign_splits_at_the_last_at() -> None:
    url = make_url("amqp://app:p@ss@h:5672")

    assert (url.username, url.password, url.host) == ("app", "p@ss", "h")


def test_user_without_password() -> None:
    url = make_url("amqp://app@h")

    assert (url.username, url.password) == ("app", None)
    assert str(url) == "amqp://app@h"


@pytest.mark.parametrize(
    "text",
    [f"amqp://app:{SECRET}@h:5672/", f"kafka://app:{SECRET}@b1:9092,b2:9092?acks=all",
     f"amqp://:{SECRET}@h"],
)
def test_password_is_masked_in_str_and_repr(text: str) -> None:
    url = make_url(text)

    for shown in (str(url), repr(url), url.render(), f"{url}", f"{url!r}"):
        assert SECRET not in shown
        assert "***" in shown


def test_password_is_masked_in_a_container_repr() -> None:
    url = make_url(f"amqp://app:{SECRET}@h")

    assert SECRET not in repr([url, {"url": url}])


def test_username_stays_visible_when_the_password_is_masked() -> None:
    assert str(make_url(f"amqp://app:{SECRET}@h")) == "amqp://app:***@h"


@pytest.mark.parametrize("option", ["password", "sasl_password", "api_token", "client_secret"])
def test_query_options_named_like_credentials_are_masked(option: str) -> None:
    url = make_url(f"kafka://h?{option}={SECRET}&acks=all")

    assert SECRET not in str(url)
    assert SECRET not in repr(url)
    assert "acks=all" in str(url)
    assert SECRET in url.render(hide_password=False)


def test_render_with_hide_password_false_reveals_the_password_for_drivers() -> None:
    url = make_url("amqp://app:p%40ss@h:5672/")

    assert url.render(hide_password=False) == "amqp://app:p%40ss@h:5672/"


@pytest.mark.parametrize(
    "text",
    [
        # raw reserved characters inside the password split the URL in odd places
        f"amqp://app:{SECRET}/x@h:5672",
        f"amqp://app:1/{SECRET}@h",
        f"amqp://app:{SECRET}?x@h",
        f"amqp://app:{SECRET}?a=b@h:bad",
        f"amqp://app:{SECRET}#x@h",
        f"amqp://app:{SECRET} x@h",
        # otherwise malformed URLs that carry a password
        f"amqp://app:{SECRET}@h:99999",
        f"amqp://app:{SECRET}@h:port",
        f"amqp://app:{SECRET}@,h",
        f"amqp://app:{SECRET}@[::g]",
        f"amqp://app:{SECRET}@h?novalue",
        f"amqp://app:{SECRET}@h?a=1&a=2",
        f"amqp://app:{SECRET}@h#frag",
        f"amqp://app:{SECRET}%ff@h",
        f"app:{SECRET}@h:5672",
        f"1amqp://app:{SECRET}@h",
    ],
)
def test_errors_for_malformed_urls_never_echo_the_password(text: str) -> None:
    with pytest.raises(InvalidURL) as caught:
        make_url(text)

    assert SECRET not in str(caught.value)
    assert SECRET not in repr(caught.value)


def test_error_for_a_malformed_url_shows_what_is_wrong() -> None:
    with pytest.raises(InvalidURL, match=r"port '99999' is not in 1\.\.65535"):
        make_url("amqp://app:pw@h:99999")


def test_url_is_immutable() -> None:
    url = make_url("amqp://app:pw@h?a=1")

    with pytest.raises(dataclasses.FrozenInstanceError):
        url.password = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        url.query["a"] = "2"  # type: ignore[index]
    assert url.query["a"] == "1"


def test_url_query_is_copied_from_the_given_mapping() -> None:
    options = {"a": "1"}
    url = URL("kafka", (HostPort("h"),), query=options)
    options["a"] = "2"

    assert url.query["a"] == "1"


def test_with_query_and_without_query_return_new_urls() -> None:
    url = make_url("kafka://h?a=1&b=2")

    assert dict(url.with_query(b="3", c="4").query) == {"a": "1", "b": "3", "c": "4"}
    assert dict(url.without_query("a").query) == {"b": "2"}
    assert dict(url.query) == {"a": "1", "b": "2"}


def test_query_keeps_its_order() -> None:
    assert list(make_url("kafka://h?z=1&a=2&m=3").iter_query()) == [
        ("z", "1"), ("a", "2"), ("m", "3")]


def test_query_values_are_percent_and_plus_decoded() -> None:
    url = make_url("kafka://h?a=x+y&b=x%2By&c=%C3%BC")

    assert dict(url.query) == {"a": "x y", "b": "x+y", "c": "ü"}


def test_equal_urls_are_equal_and_hash_equal() -> None:
    a = make_url("kafka://u:p@b1:9092,b2:9092?x=1&y=2")
    b = make_url("KAFKA://u:p@b1:9092,b2:9092?y=2&x=1")

    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1


@pytest.mark.parametrize(
    "other",
    ["kafka://u:q@b1:9092", "kafka://v:p@b1:9092", "kafka://u:p@b1:9093", "kafka://u:p@b2:9092",
     "kafka://u:p@b1:9092/x", "kafka://u:p@b1:9092?x=1", "amqp://u:p@b1:9092",
     "kafka://u:p@b1:9092,b3:9092"],
)
def test_urls_differing_in_any_part_are_unequal(other: str) -> None:
    assert make_url("kafka://u:p@b1:9092") != make_url(other)


def test_url_is_not_equal_to_its_string() -> None:
    url = make_url("kafka://h")

    assert url != "kafka://h"


@pytest.mark.parametrize(
    "text",
    ["kafka://h:0", "kafka://h:65536", "kafka://h:port", "kafka://h:", "kafka://h:-1",
     "kafka://h:+1", "kafka://h:١٢", "kafka://h:1:2", "kafka://b1:9092,b2:x"],
)
def test_bad_ports_are_invalid(text: str) -> None:
    with pytest.raises(InvalidURL, match="port"):
        make_url(text)


@pytest.mark.parametrize("port", [1, 65535])
def test_ports_at_the_limits_are_valid(port: int) -> None:
    assert make_url(f"kafka://h:{port}").port == port


@pytest.mark.parametrize(
    "text",
    ["kafka://b1:9092,,b2:9092", "kafka://,b1", "kafka://b1,", "kafka://,", "kafka://:9092",
     "amqp://u:p@:5672"],
)
def test_empty_hosts_are_invalid(text: str) -> None:
    with pytest.raises(InvalidURL, match="host"):
        make_url(text)


@pytest.mark.parametrize("text", ["kafka://a%2Cb:1", "kafka://h_!:1", "kafka://ho st"])
def test_invalid_host_names_are_refused(text: str) -> None:
    with pytest.raises(InvalidURL):
        make_url(text)


def test_duplicate_query_option_is_invalid_and_named() -> None:
    with pytest.raises(InvalidURL, match="'prefetch' is given twice"):
        make_url("amqp://h?prefetch=1&prefetch=2")


def test_duplicate_query_option_is_detected_after_decoding() -> None:
    with pytest.raises(InvalidURL, match="given twice"):
        make_url("amqp://h?a=1&%61=2")


@pytest.mark.parametrize("text", ["amqp://h?novalue", "amqp://h?=1", "amqp://h?a=1&b"])
def test_query_part_without_option_name_or_value_is_invalid(text: str) -> None:
    with pytest.raises(InvalidURL, match="option=value"):
        make_url(text)


def test_empty_query_parts_are_ignored() -> None:
    assert dict(make_url("amqp://h?&a=1&&").query) == {"a": "1"}


@pytest.mark.parametrize(
    "text",
    ["localhost:5672", "amqp:/h", "", "://h", "1amqp://h", "am qp://h", "amqp://h#frag",
     "amqp://h /x", "amqp://h/%ff", "amqp://h?a=%ff"],
)
def test_malformed_urls_are_invalid(text: str) -> None:
    with pytest.raises(InvalidURL):
        make_url(text)


@pytest.mark.parametrize("value", [None, 5, b"amqp://h"])
def test_make_url_refuses_non_strings(value: object) -> None:
    with pytest.raises(InvalidURL, match=r"must be a str or unibus\.URL"):
        make_url(value)  # type: ignore[arg-type]


def test_make_url_returns_a_url_unchanged() -> None:
    url = make_url("amqp://h")

    assert make_url(url) is url


def test_invalid_url_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        make_url("nonsense")


def test_amqp_vhost_path_is_decoded_and_re_encoded() -> None:
    url = make_url("amqp://h/%2F")

    assert url.path == "//"
    assert str(url) == "amqp://h/%2F"


@pytest.mark.parametrize(
    "text",
    [
        "amqp://app:p%40ss@h:5672/%2F?heartbeat=5",
        "amqps://app:p%3Ass%2F%3F%23%25@h1:1,h2:2/vhost",
        "kafka://b1:9092,b2:9093?acks=all&linger=5ms&x=a%26b%3Dc",
        "nats://[::1]:4222,127.0.0.1:4223",
        "nats+core://token@h",
        "memory://",
        "memory://7f3c0f9e-6a7b-4d71-8c1b-2f0e7d6b9c10",
        "amqp://@h",
        "amqp://:pw@h",
        "amqp://h/a%3Fb%23c",
        "kafka://h?sasl_password=p%40ss",
    ],
)
def test_render_without_masking_round_trips(text: str) -> None:
    url = make_url(text)

    assert make_url(url.render(hide_password=False)) == url


@pytest.mark.parametrize(
    "url",
    [
        URL("amqp", (HostPort("h", 5672),), username="us:er@x", password="p@ss:/?#%&= ü ",
            path="/v/h?st", query={"a b": "c&d=e+f", "ü": "%"}),
        URL("kafka", (HostPort("::1", 1), HostPort("b", None)), username="", password=""),
        URL("nats", (), username="", password=None, query={"token": "t:/@?"}),
    ],
)
def test_urls_built_with_awkward_characters_round_trip(url: URL) -> None:
    assert make_url(url.render(hide_password=False)) == url
