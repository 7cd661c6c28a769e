#!/usr/bin/env python3
"""One entry point for a fresh checkout: ``python3 dev.py up`` and ``python3 dev.py test``.

It needs only Python >= 3.11 with pip. It creates ``.venv`` beside this file, installs
the project into it (again only when ``pyproject.toml`` changed), then runs the command
inside it. Everything the project needs is installed from its own files.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"
STAMP = VENV / ".installed-from"


def say(message: str) -> None:
    print(f"[dev] {message}", flush=True)


def ensure_environment() -> None:
    if sys.version_info < (3, 11):
        sys.exit(f"[dev] Python >= 3.11 is needed, this is {sys.version.split()[0]}")
    if (BIN / "python").exists() and not _has_pip():
        say(".venv has no pip (an interrupted first run?): creating it again")
        shutil.rmtree(VENV)
    if not (BIN / "python").exists():
        say(f"creating virtualenv {VENV}")
        try:
            venv.EnvBuilder(with_pip=True).create(VENV)
        except (subprocess.CalledProcessError, OSError) as exc:
            shutil.rmtree(VENV, ignore_errors=True)  # never leave a venv without pip behind
            sys.exit(f"[dev] could not create {VENV} with pip ({exc}); on Debian/Ubuntu install "
                     "the python3-venv package (e.g. apt install python3.11-venv) and run this again")
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text().strip() == wanted:
        return
    say("installing the project and its test tools into .venv (first run takes a minute)")
    pip = [str(BIN / "python"), "-m", "pip", "--disable-pip-version-check"]
    subprocess.run(pip + ["install", "--quiet", "--upgrade", "pip", "setuptools", "wheel"], check=True)
    subprocess.run(pip + ["install", "--quiet", "-e", f"{ROOT}[test]"], check=True)
    STAMP.write_text(wanted + "\n")
    say("environment ready")


def _has_pip() -> bool:
    return subprocess.call([str(BIN / "python"), "-c", "import pip"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) == 0


def run(argv: list[str]) -> int:
    """Become the tool (exec), so Ctrl-C or a supervisor's SIGTERM reaches it directly:
    a wrapper process in between could die and leave a running cluster behind."""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", VIRTUAL_ENV=str(VENV))
    os.chdir(ROOT)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)
    return 127  # not reached: execve replaces this process or raises OSError


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python3 dev.py",
        description="Set up .venv and run HyperMesh Consensus from a fresh checkout.",
        epilog="Examples:\n  python3 dev.py up              # 4-node local cluster on [::1]:9292-9295\n"
        "  python3 dev.py test            # the whole test suite\n"
        "  python3 dev.py test -k proofs  # extra arguments go to pytest",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start a local cluster (extra arguments go to 'hypermesh up', e.g. --nodes 7)")
    sub.add_parser("test", help="run the whole test suite (extra arguments go to pytest, e.g. -k proofs)")
    sub.add_parser("env", help="only create/refresh .venv")
    # Only the command is ours: everything after it goes, verbatim, to the tool it runs
    # (argparse would take '-k' or '--nodes' for options of its own and refuse them).
    argv = sys.argv[1:]
    options = parser.parse_args(argv[:1])
    extra = argv[1:]
    if options.command == "env" and extra:
        parser.error(f"env takes no arguments (got {' '.join(extra)})")
    ensure_environment()
    if options.command == "up":
        return run([str(BIN / "hypermesh"), "up", *extra])
    if options.command == "test":
        return run([str(BIN / "python"), "-m", "pytest", *extra])
    return 0


if __name__ == "__main__":
    sys.exit(main())
