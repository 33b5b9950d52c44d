"""Every error of the ``pagefusion`` command is one line, without a traceback."""

from __future__ import annotations

import pytest

from pagefusion import cli


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["set", "vm", "on", "--group", "a b"], "invalid page-fusion group 'a b'"),
        (["set", "vm", "on", "--group", "x" * 500], "1 to 64 characters"),
        (["set", "vm", "maybe"], "invalid choice: 'maybe'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_usage_errors_are_one_line(capsys, argv, reason):
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("pagefusion: ")
    assert reason in err


def test_help_lists_only_working_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    commands = (
        "install",
        "uninstall",
        "show",
        "set",
        "metrics",
        "status",
        "doctor",
        "daemon",
        "demo",
    )
    for command in commands:
        assert f"    {command} " in out
