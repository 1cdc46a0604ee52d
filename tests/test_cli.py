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


# ── issue 10: Ctrl-C at start-up, warnings, undecodable text ─────────────────────────
_INTERRUPT_AFTER = """
import os, signal, sys, threading
import olmoscope  # the interpreter's own start-up is over
# A signal while this harness still runs (a loaded machine starts the timer's thread late) is not olmoscope's to
# handle: exit 99 and let the test run that delay again. Python's own handler is back just before olmoscope's code.
signal.signal(signal.SIGINT, lambda *_: os._exit(99))
timer = threading.Timer(float(sys.argv[1]), os.kill, (os.getpid(), signal.SIGINT))
timer.daemon = True  # a run that ends first does not wait for it
timer.start()
signal.signal(signal.SIGINT, signal.default_int_handler)
from olmoscope.cli import main
main(["arch", "olmo2-1b"])
"""


def test_ctrl_c_at_any_moment_of_start_up_is_one_line():
    import signal
    import sys

    for delay in (0.002, 0.01, 0.02, 0.04, 0.08, 0.16):
        for _ in range(5):  # until the signal lands in olmoscope's code rather than the harness's
            run = subprocess.run([sys.executable, "-c", _INTERRUPT_AFTER, str(delay)], capture_output=True, text=True,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as test_convert's
            if run.returncode != 99:
                break
        assert "Traceback" not in run.stderr, (delay, run.stderr)
        if run.returncode != 0:  # it may finish first on a fast machine
            assert (run.returncode, run.stderr) == (130, "olmoscope: interrupted\n"), (delay, run.returncode, run.stderr)


def test_warnings_are_one_line_and_numpy_floating_point_notices_are_dropped():
    import warnings

    import click
    import numpy as np
    from click.testing import CliRunner

    from olmoscope.cli import main

    @click.command("warn-test")
    def warn_test():
        np.float32(1e38) * np.float32(10)  # RuntimeWarning: overflow encountered in scalar multiply
        warnings.warn("something odd\nover two lines", UserWarning)

    main.add_command(warn_test)
    try:
        result = CliRunner().invoke(main, ["warn-test"])
    finally:
        main.commands.pop("warn-test")
    assert result.exit_code == 0, result.output
    assert result.stderr == "olmoscope: warning: something odd\\nover two lines\n"


def test_a_source_name_that_is_not_utf8_prints_under_a_strict_locale(tmp_path):
    """Issue 10, item 5: with a UTF-8 (strict) stdout, printing the folder name raised UnicodeEncodeError."""
    import json
    import os

    from conftest import TINY_CONFIG

    folder = os.fsencode(tmp_path) + b"/model\xff"
    os.mkdir(folder)
    with open(folder + b"/config.json", "w") as f:
        json.dump(TINY_CONFIG, f)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    ok = subprocess.run([b"olmoscope", b"arch", folder], capture_output=True, env=env)
    assert ok.returncode == 0 and b"model\\udcff" in ok.stdout, ok.stderr
    bad = subprocess.run([b"olmoscope", b"tensors", folder], capture_output=True, env=env)
    assert bad.returncode == 1 and bad.stderr.count(b"\n") == 1 and b"model\\udcff" in bad.stderr, bad.stderr


def test_an_allocation_that_fails_is_one_line_not_a_traceback(monkeypatch):
    """The last line of defence (sizes are checked before allocating where olmoscope can): numpy's MemoryError."""
    import numpy as np
    from click.testing import CliRunner

    from cli_checks import assert_one_line_error
    from olmoscope import arch
    from olmoscope.cli import main

    def allocate(*args, **kwargs):
        return np.zeros(1 << 58, np.uint8)  # 256 PiB: no machine has it

    monkeypatch.setattr(arch, "arch_report", allocate)
    assert_one_line_error(CliRunner().invoke(main, ["arch", "olmo2-1b"]), "not enough memory (Unable to allocate",
                          exit_code=1)
