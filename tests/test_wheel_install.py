"""A non-editable wheel install carries cuda/ and schemas/ and works from a fresh virtual environment."""

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_into_fresh_venv_and_runs_arch(tmp_path):
    wheelhouse = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheelhouse, ROOT],
        check=True,
    )
    (wheel,) = wheelhouse.glob("olmoscope-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", wheel], check=True)

    # Run from an unrelated folder so nothing is imported from the source tree.
    run = subprocess.run(
        [env_dir / "bin" / "olmoscope", "arch", "olmo2-7b", "--json"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "7298617344" in run.stdout.replace(",", "")
    probe = (
        "from importlib import resources as r;"
        "k = [p.name for p in r.files('olmoscope.kernels').iterdir()];"
        "s = [p.name for p in r.files('olmoscope.schemas').iterdir()];"
        "assert any(n.endswith('.cu') for n in k), k;"
        "assert 'arch-report.schema.json' in s and 'engine-header.schema.json' in s, s;"
        "import olmoscope.runtime"
    )
    check = subprocess.run([python, "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
