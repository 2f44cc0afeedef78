"""The `moequant` command line itself: --version, and mistyped flags or commands."""

from __future__ import annotations

from importlib.metadata import version

import pytest

from moequant.cli import main


def run(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0
    assert out.strip() == (
        f"moequant {version('moequant')} (mlx {version('mlx')}, mlx-lm {version('mlx-lm')})"
    )


@pytest.mark.parametrize(
    "argv,usage,hint",
    [
        (
            ("convert", "--hf-path", "x", "--mlx-pth", "y"),
            "usage: moequant convert",
            "did you mean --mlx-path?",
        ),
        (
            ("plan", "--config", "c.json", "--recipes", "alis-3.6"),
            "usage: moequant plan",
            "did you mean --recipe?",
        ),
        (
            ("eval", "--ref", "a", "--model", "b", "--seq-length=512"),
            "usage: moequant eval",
            "did you mean --seq-len?",
        ),
        (
            ("generate", "--model", "m", "--temperature", "1"),
            "usage: moequant generate",
            "did you mean --temp?",
        ),
        (("serve", "--model", "m", "--prot", "8080"), "usage: moequant serve", "did you mean --port?"),
    ],
)
def test_mistyped_flag_shows_the_subcommand_usage_and_a_close_match(capsys, argv, usage, hint):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith(usage), err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"moequant {argv[0]}: error: unrecognized arguments") and last.endswith(
        f"({hint})"
    ), last


def test_unknown_flag_without_a_close_match(capsys):
    code, _, err = run(capsys, "convert", "--hf-path", "x", "--zzzz")
    assert code == 2 and err.startswith("usage: moequant convert")
    assert err.strip().endswith("unrecognized arguments: --zzzz")


def test_mistyped_command_suggests_the_command(capsys):
    code, _, err = run(capsys, "convrt")
    assert code == 2 and err.strip().endswith("(did you mean convert?)")
