"""The CLI shell: version, help, and the one-line error contract."""

import subprocess
import sys

from click.testing import CliRunner

from wsiseg import __version__
from wsiseg.cli import main


def test_version_and_help():
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0 and "learning where to sample" in r.output


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "wsiseg", "--version"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert __version__ in out.stdout
