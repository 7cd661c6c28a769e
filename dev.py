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
    if not (BIN / "python").exists():
        say(f"creating virtualenv {VENV}")
        venv.EnvBuilder(with_pip=True).create(VENV)
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text().strip() == wanted:
        return
    say("installing the project and its test tools into .venv (first run takes a minute)")
    pip = [str(BIN / "python"), "-m", "pip", "--disable-pip-version-check"]
    subprocess.run(pip + ["install", "--quiet", "--upgrade", "pip", "setuptools", "wheel"], check=True)
    subprocess.run(pip + ["install", "--quiet", "-e", f"{ROOT}[test]"], check=True)
    STAMP.write_text(wanted + "\n")
    say("environment ready")


def run(argv: list[str]) -> int:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", VIRTUAL_ENV=str(VENV))
    try:
        return subprocess.call(argv, cwd=ROOT, env=env)
    except KeyboardInterrupt:
        return 130


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
    up = sub.add_parser("up", help="start a local cluster (extra arguments go to 'hypermesh up')")
    up.add_argument("args", nargs=argparse.REMAINDER)
    test = sub.add_parser("test", help="run the whole test suite (extra arguments go to pytest)")
    test.add_argument("args", nargs=argparse.REMAINDER)
    shell = sub.add_parser("env", help="only create/refresh .venv")
    del shell
    options = parser.parse_args()
    ensure_environment()
    if options.command == "up":
        return run([str(BIN / "hypermesh"), "up", *options.args])
    if options.command == "test":
        return run([str(BIN / "python"), "-m", "pytest", *options.args])
    return 0


if __name__ == "__main__":
    sys.exit(main())
