"""``consensus-server`` command line: values that make no sense are refused before
anything starts, with argparse's exit status 2 and a message naming the flag and the
range; the cluster-wide flags say so in --help."""

from __future__ import annotations

import argparse

import pytest

import node.main
from node.main import build_parser, main


@pytest.fixture(autouse=True)
def no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """A value that slipped through must fail the test, not start a node in the cwd."""
    async def refuse_to_serve(args: argparse.Namespace) -> int:
        raise AssertionError(f"consensus-server would have started with {args}")

    monkeypatch.setattr(node.main, "serve", refuse_to_serve)


@pytest.mark.parametrize(("flag", "value", "allowed"), [
    ("--batch-size", "0", "an integer >= 1"),
    ("--request-timeout", "-3", "a number > 0"),
    ("--request-timeout", "0", "a number > 0"),
    ("--request-timeout", "nan", "a number > 0"),
    ("--checkpoint-interval", "0", "an integer >= 1"),
    ("--view-change-timeout-ms", "0", "an integer >= 1"),
    ("--max-validations", "0", "an integer >= 1"),
    ("--port", "70000", "an integer 0..65535"),
    ("--port", "-1", "an integer 0..65535"),
    ("--metrics-port", "65536", "an integer 0..65535"),
    ("--max-datagram-size", "1199", "an integer 1200..65527"),
    ("--max-datagram-size", "65528", "an integer 1200..65527"),
    ("--batch-delay-ms", "-1", "an integer >= 0"),
    ("--cache-ttl", "0", "a number > 0"),
    ("--cache-size", "0", "an integer >= 1"),
    ("--vote-grace-ms", "-1", "a number >= 0"),
    ("--shutdown-grace", "3601", "a number 0..3600"),
    ("--peer-delay-ms", "inf", "a number >= 0"),
    ("--batch-size", "2.5", "an integer >= 1"),
])
def test_a_nonsense_value_is_refused_naming_the_flag_and_the_range(
        capsys: pytest.CaptureFixture[str], flag: str, value: str, allowed: str) -> None:
    with pytest.raises(SystemExit) as refused:
        main([flag, value])
    assert refused.value.code == 2
    # "argument --batch-size: must be an integer >= 1, not '0'" (-p/--port for the port)
    assert f"{flag}: must be {allowed}, not {value!r}" in capsys.readouterr().err


def test_the_edges_of_each_range_are_accepted() -> None:
    args = build_parser().parse_args([
        "--port", "0", "--metrics-port", "65535", "--batch-size", "1", "--checkpoint-interval", "1",
        "--view-change-timeout-ms", "1", "--request-timeout", "0.5", "--max-validations", "1",
        "--max-datagram-size", "65527", "--batch-delay-ms", "0", "--vote-grace-ms", "0", "--shutdown-grace", "0",
    ])
    assert (args.port, args.metrics_port, args.batch_size, args.max_datagram_size) == (0, 65535, 1, 65527)
    assert args.request_timeout == 0.5 and args.vote_grace_ms == 0.0
    assert build_parser().parse_args(["--max-datagram-size", "1200"]).max_datagram_size == 1200


def test_cluster_wide_flags_say_in_help_that_every_node_needs_the_same_value() -> None:
    helps = {action.option_strings[-1]: action.help or "" for action in build_parser()._actions}
    for flag in ("--batch-size", "--checkpoint-interval", "--view-change-timeout-ms"):
        assert "must be the same on every node of the cluster" in helps[flag], flag
    for flag in ("--request-timeout", "--batch-delay-ms", "--max-validations"):  # node-local
        assert "same on every node" not in helps[flag], flag


def test_cluster_without_node_id_is_refused_with_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as refused:
        main(["--cluster", "/nonexistent/cluster"])
    assert refused.value.code == 2
    assert "--node-id is required with --cluster" in capsys.readouterr().err
