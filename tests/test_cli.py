"""The command line as a whole: usage errors are one line, like every other error."""

import subprocess


def test_click_usage_errors_are_one_line_naming_the_help():
    run = subprocess.run(["olmoscope", "arch", "olmo2-1b", "--no-such-option"], capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith("olmoscope: error: No such option") and "olmoscope arch --help" in run.stderr
    assert "Traceback" not in run.stderr and run.stdout == ""


def test_bare_command_prints_the_help_and_succeeds():
    run = subprocess.run(["olmoscope"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("Usage: olmoscope") and "generate" in run.stdout
