"""Version routing: explicit versions, weighted sticky splits, and the parser of TRITONQ_ROUTES."""

from __future__ import annotations

import pytest

from worker.routing import choose_version, parse_routes


def test_an_explicit_version_wins() -> None:
    routes = parse_routes("enhance=1:90,2:10")
    assert choose_version("enhance", "2", "job", routes) == "2"


def test_models_without_a_split_get_tritons_default() -> None:
    assert choose_version("upscale", "", "job", parse_routes("enhance=1:90,2:10")) == ""


def test_the_split_follows_its_weights_and_is_sticky() -> None:
    routes = parse_routes("enhance=1:90,2:10")
    picks = [choose_version("enhance", "", f"job-{i}", routes) for i in range(20_000)]
    share = picks.count("2") / len(picks)
    assert 0.09 < share < 0.11
    assert picks == [choose_version("enhance", "", f"job-{i}", routes) for i in range(20_000)]


def test_a_split_of_one_version_always_picks_it() -> None:
    routes = parse_routes("enhance=2:1")
    assert {choose_version("enhance", "", f"j{i}", routes) for i in range(100)} == {"2"}


def test_several_models_parse() -> None:
    routes = parse_routes(" enhance=1:90, 2:10 ; upscale=1:1 ;")
    assert routes["enhance"].versions == ("1", "2")
    assert routes["enhance"].weights == (90, 10)
    assert routes["upscale"].versions == ("1",)


@pytest.mark.parametrize("text", ["enhance", "enhance=", "enhance=1", "enhance=a:1", "enhance=1:0", "=1:1", "e=1:x"])
def test_malformed_routes_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="route"):
        parse_routes(text)
