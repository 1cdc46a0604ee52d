"""Checks shared by the CLI tests: every error a user can cause is one line on stderr, never a traceback."""


def assert_one_line_error(result, *fragments: str, exit_code: int | None = None) -> None:
    """`result` (click's CliRunner) failed cleanly with one `olmoscope: error:` line holding every fragment."""
    assert result.exit_code != 0, result.output
    if exit_code is not None:
        assert result.exit_code == exit_code, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), f"not a clean exit: {result.exception!r}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("olmoscope: error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
