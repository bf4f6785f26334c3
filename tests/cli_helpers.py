"""What the CLI tests share: run `dbtrain ...` in-process and check a one-line error."""
from __future__ import annotations

from trainer import cli


def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of `dbtrain ARGV`, in this process."""
    code = cli.main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def one_line_error(code, err, *parts):
    """Exit 2, no traceback, exactly one `dbtrain: error:` line holding every part; returns that line."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.startswith("dbtrain: error:")]
    assert len(lines) == 1, err
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]
