#!/usr/bin/env python3
"""Build every container image HyperMesh Consensus needs, with or without a registry.

One command, safe to run again and again: each step is skipped when its result is
already there and still matches its inputs.

1. **Base image.** ``python:3.11-slim`` when it is present or can be pulled; otherwise
   ``hypermesh-base:bookworm`` built from Debian's archive with ``debootstrap`` and
   ``docker import`` (no registry needed). Skipped when the image exists.
2. **Wheels.** Dependencies are fetched on the host as CPython 3.11 manylinux/abi3/pure
   wheels (``pip download --platform ...``) into ``ops/.build/wheels/deps``, again only
   when the dependency list changed; the project wheel is rebuilt into
   ``ops/.build/wheels/project`` when a source file changed. The image installs from
   these wheels only (``pip install --no-index``): inside ``docker build`` the package
   index is reachable only through a TLS-intercepting proxy, if at all.
3. **Project image.** ``hypermesh-consensus:src-<hash>`` where ``<hash>`` covers the
   sources, ``pyproject.toml`` and the Dockerfile; also tagged ``hypermesh-consensus:latest``
   (what ``compose.yaml`` runs). Skipped when the tag for the current hash exists.

The classic builder is used (``DOCKER_BUILDKIT=0``): the docker client here may lack buildx.

Examples::

    python3 ops/build_images.py                 # build what is missing
    python3 ops/build_images.py --base debootstrap --rebuild-base
    python3 ops/build_images.py --print-tag     # only print the image tag for these sources
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPS = ROOT / "ops"
BUILD = OPS / ".build"
WHEELS = BUILD / "wheels"
DEPS = WHEELS / "deps"
PROJECT = WHEELS / "project"
CONTEXT = BUILD / "context"

REGISTRY_BASE = "python:3.11-slim"
LOCAL_BASE = "hypermesh-base:bookworm"
IMAGE_REPO = "hypermesh-consensus"
SOURCE_DIRS = ("consensus", "transport", "node", "cluster")
SOURCE_FILES = ("pyproject.toml", "README.md", "ops/Dockerfile", "ops/hypermesh-node")
DEBOOTSTRAP_PACKAGES = "python3,python3-venv,python3-pip,ca-certificates,iproute2,iptables"
# The image's Python is CPython 3.11 on glibc 2.36 (bookworm); accept every manylinux
# tag up to that glibc. pip does not expand manylinux_2_x tags by itself.
PLATFORMS = ["manylinux2014_x86_64"] + [f"manylinux_2_{minor}_x86_64" for minor in range(17, 37)]


def say(message: str) -> None:
    print(f"[build-images] {message}", flush=True)


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    say("$ " + " ".join(cmd))
    return subprocess.run(cmd, check=True, **kwargs)


def image_exists(ref: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", ref], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0


def source_hash() -> str:
    """Hash of everything that ends up in the project image."""
    h = hashlib.sha256()
    paths: list[Path] = []
    for folder in SOURCE_DIRS:
        base = ROOT / folder
        if base.is_dir():
            paths += [p for p in base.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                      and p.suffix not in {".pyc", ".pyo"}]
    paths += [ROOT / name for name in SOURCE_FILES if (ROOT / name).is_file()]
    for path in sorted(paths):
        h.update(str(path.relative_to(ROOT)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def dependency_list() -> list[str]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return list(project.get("dependencies", []))


def host_python() -> str:
    """The project's .venv: it has the setuptools that pyproject.toml needs, which a
    stock Python 3.11 (setuptools 65) does not. ``dev.py env`` makes it if missing."""
    venv = ROOT / ".venv" / "bin" / "python"
    if not venv.exists():
        say("no .venv yet: creating it (python3 dev.py env)")
        run([sys.executable, str(ROOT / "dev.py"), "env"])
    return str(venv)


# ---------------------------------------------------------------------------- base


def ensure_base(mode: str, rebuild: bool) -> str:
    """Return the base image reference, building or pulling it only when needed."""
    if mode != "debootstrap" and not rebuild and image_exists(REGISTRY_BASE):
        say(f"base: {REGISTRY_BASE} is present, using it")
        return REGISTRY_BASE
    if mode != "registry" and not rebuild and image_exists(LOCAL_BASE):
        say(f"base: {LOCAL_BASE} is present, using it (skip debootstrap)")
        return LOCAL_BASE
    if mode != "debootstrap":
        say(f"base: trying to pull {REGISTRY_BASE}")
        try:
            pulled = subprocess.run(["docker", "pull", REGISTRY_BASE], capture_output=True,
                                    text=True, timeout=300)
            if pulled.returncode == 0:
                say(f"base: pulled {REGISTRY_BASE}")
                return REGISTRY_BASE
            lines = pulled.stderr.strip().splitlines()
            say(f"base: pull failed ({lines[-1] if lines else 'no output'})")
        except subprocess.TimeoutExpired:
            say("base: pull timed out")
        if mode == "registry":
            sys.exit(f"[build-images] --base registry: cannot get {REGISTRY_BASE}")
        say(f"base: no registry; building {LOCAL_BASE} from Debian's archive instead")
    build_debootstrap_base()
    return LOCAL_BASE


def build_debootstrap_base() -> None:
    if os.geteuid() != 0:
        sys.exit("[build-images] building the base image with debootstrap needs root")
    if shutil.which("debootstrap") is None:
        say("base: debootstrap is missing, installing it with apt-get")
        run(["apt-get", "update", "-qq"])
        run(["apt-get", "install", "-y", "-qq", "debootstrap"])
    BUILD.mkdir(parents=True, exist_ok=True)
    rootfs = Path(tempfile.mkdtemp(prefix="rootfs-", dir=BUILD))
    try:
        say(f"base: debootstrap bookworm into {rootfs} (about a minute)")
        run(["debootstrap", "--variant=minbase", f"--include={DEBOOTSTRAP_PACKAGES}",
             "bookworm", str(rootfs)], stdout=subprocess.DEVNULL)
        say("base: trimming docs, man pages, locales, apt lists and caches")
        for rel in ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
                    "var/lib/apt/lists", "var/cache/apt", "var/cache/debconf", "var/log"):
            target = rootfs / rel
            if target.exists():
                shutil.rmtree(target)
                target.mkdir(parents=True)
        for cache in rootfs.rglob("__pycache__"):
            shutil.rmtree(cache, ignore_errors=True)
        say(f"base: docker import -> {LOCAL_BASE}")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["docker", "import",
                        "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                        "--change", "ENV LANG=C.UTF-8",
                        "--change", 'CMD ["/bin/bash"]',
                        "-", LOCAL_BASE], stdin=tar.stdout, check=True, stdout=subprocess.DEVNULL)
        tar.stdout.close()
        if tar.wait() != 0:
            sys.exit("[build-images] tar of the rootfs failed")
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


# -------------------------------------------------------------------------- wheels


def ensure_dependency_wheels(force: bool) -> None:
    deps = dependency_list()
    stamp_value = hashlib.sha256(("\n".join(deps) + "\n" + " ".join(PLATFORMS)).encode()).hexdigest()
    stamp = DEPS / ".stamp"
    if not force and stamp.exists() and stamp.read_text().strip() == stamp_value:
        say(f"wheels: dependency wheels are up to date ({len(list(DEPS.glob('*.whl')))} in {DEPS.relative_to(ROOT)})")
        return
    say("wheels: fetching CPython 3.11 manylinux/abi3/pure wheels of the dependencies")
    if DEPS.exists():
        shutil.rmtree(DEPS)
    DEPS.mkdir(parents=True)
    platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
    cmd = [host_python(), "-m", "pip", "--disable-pip-version-check", "download", "--quiet",
           "--dest", str(DEPS), "--only-binary=:all:", "--implementation", "cp",
           "--python-version", "3.11", *platform_args, *deps]
    try:
        run(cmd)
    except subprocess.CalledProcessError:
        # A dependency without a binary wheel: build wheels on the host instead and
        # check below that each one is something the image can install.
        say("wheels: pip download failed, falling back to 'pip wheel' on the host")
        run([host_python(), "-m", "pip", "--disable-pip-version-check", "wheel", "--quiet",
             "--wheel-dir", str(DEPS), *deps])
    check_wheel_tags(DEPS)
    stamp.write_text(stamp_value + "\n")


def check_wheel_tags(folder: Path) -> None:
    """Refuse wheels that CPython 3.11 on glibc 2.36 x86_64 cannot install."""
    bad = []
    for wheel in folder.glob("*.whl"):
        parts = wheel.stem.split("-")
        python_tag, abi_tag, platform_tag = parts[-3], parts[-2], parts[-1]
        pythons = python_tag.split(".")
        ok_python = any(p in {"py3", "cp311", "py311"} or (p.startswith("cp3") and abi_tag == "abi3"
                        and int(p[3:] or 0) <= 11) for p in pythons)
        platforms = platform_tag.split(".")
        ok_platform = any(p == "any" or p in PLATFORMS or p in {"manylinux2010_x86_64", "manylinux1_x86_64"}
                          for p in platforms)
        if not (ok_python and ok_platform):
            bad.append(wheel.name)
    if bad:
        sys.exit(f"[build-images] wheels the image cannot install: {', '.join(bad)}")


def ensure_project_wheel(src_hash: str, force: bool) -> None:
    stamp = PROJECT / ".stamp"
    if not force and stamp.exists() and stamp.read_text().strip() == src_hash and list(PROJECT.glob("*.whl")):
        say("wheels: project wheel is up to date")
        return
    say("wheels: building the project wheel")
    if PROJECT.exists():
        shutil.rmtree(PROJECT)
    PROJECT.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="hm-wheel-") as tmp:
        # Build from a copy so setuptools' build/ and egg-info never land in the checkout.
        src = Path(tmp) / "src"
        src.mkdir()
        for name in SOURCE_DIRS:
            if (ROOT / name).is_dir():
                shutil.copytree(ROOT / name, src / name,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        shutil.copy2(ROOT / "pyproject.toml", src / "pyproject.toml")
        readme = ROOT / "README.md"
        if readme.exists():
            shutil.copy2(readme, src / "README.md")
        else:
            (src / "README.md").write_text("HyperMesh Consensus\n")
        run([host_python(), "-m", "pip", "--disable-pip-version-check", "wheel", "--quiet",
             "--no-deps", "--no-build-isolation", "--wheel-dir", str(PROJECT), str(src)])
    stamp.write_text(src_hash + "\n")


# --------------------------------------------------------------------------- image


def image_id(ref: str) -> str:
    result = subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}}", ref], capture_output=True, text=True)
    return result.stdout.strip()


def image_tag(src_hash: str, base_id: str = "") -> str:
    """Tag for these sources on this base: a new base or a changed file is a new tag."""
    return f"{IMAGE_REPO}:src-{hashlib.sha256((src_hash + base_id).encode()).hexdigest()[:12]}"


def ensure_project_image(base: str, src_hash: str, force: bool) -> str:
    tag = image_tag(src_hash, image_id(base))
    if not force and image_exists(tag):
        say(f"image: {tag} is up to date (sources and base unchanged)")
        run(["docker", "tag", tag, f"{IMAGE_REPO}:latest"])
        return tag
    if CONTEXT.exists():
        shutil.rmtree(CONTEXT)
    (CONTEXT / "wheels").mkdir(parents=True)
    shutil.copytree(DEPS, CONTEXT / "wheels" / "deps", ignore=shutil.ignore_patterns(".stamp"))
    shutil.copytree(PROJECT, CONTEXT / "wheels" / "project", ignore=shutil.ignore_patterns(".stamp"))
    shutil.copy2(OPS / "Dockerfile", CONTEXT / "Dockerfile")
    shutil.copy2(OPS / "hypermesh-node", CONTEXT / "hypermesh-node")
    say(f"image: docker build {tag} FROM {base} (classic builder)")
    env = dict(os.environ, DOCKER_BUILDKIT="0")
    run(["docker", "build", "--build-arg", f"BASE={base}", "-t", tag, "-t", f"{IMAGE_REPO}:latest",
         str(CONTEXT)], env=env)
    prune_old_tags(keep=tag)
    return tag


def prune_old_tags(keep: str, keep_count: int = 3) -> None:
    """Drop older src-* tags (newest few kept); images still used by a container stay."""
    listing = subprocess.run(["docker", "image", "ls", IMAGE_REPO, "--format", "{{.Tag}} {{.CreatedAt}}"],
                             capture_output=True, text=True).stdout.split("\n")
    tags = sorted((line.split(" ", 1) for line in listing if line.startswith("src-")),
                  key=lambda item: item[1], reverse=True)
    old = [f"{IMAGE_REPO}:{tag}" for tag, _ in tags[keep_count:] if f"{IMAGE_REPO}:{tag}" != keep]
    if old:
        say(f"image: removing {len(old)} older source tag(s)")
        subprocess.run(["docker", "image", "rm", *old], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def smoke_test(tag: str) -> bool:
    """Run both console scripts' --help inside the image; report, do not hide, a failure."""
    ok = True
    for entry in ("consensus-server", "hypermesh"):
        result = subprocess.run(["docker", "run", "--rm", "--entrypoint", entry, tag, "--help"],
                                capture_output=True, text=True, timeout=120)
        if result.returncode == 0:
            say(f"smoke: '{entry} --help' works in {tag}")
        else:
            ok = False
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            say(f"smoke: '{entry} --help' FAILED in {tag}: {tail[0]}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build the HyperMesh Consensus images (base, wheels, project image); "
        "every step is skipped when already up to date.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Examples::", 1)[1] if "Examples::" in __doc__ else None,
    )
    parser.add_argument("--base", choices=["auto", "registry", "debootstrap"], default="auto",
                        help="where the base image comes from (default: python:3.11-slim if present "
                        "or pullable, else debootstrap)")
    parser.add_argument("--rebuild-base", action="store_true", help="rebuild the base image even if present")
    parser.add_argument("--rebuild-wheels", action="store_true", help="fetch/build all wheels again")
    parser.add_argument("--rebuild-image", action="store_true", help="rebuild the project image even if its tag exists")
    parser.add_argument("--no-smoke", action="store_true", help="skip running --help of both commands in the image")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the smoke check fails")
    parser.add_argument("--print-tag", action="store_true", help="print the project image tag for the current sources and exit")
    options = parser.parse_args(argv)

    src_hash = source_hash()
    if options.print_tag:
        base = REGISTRY_BASE if image_exists(REGISTRY_BASE) and options.base != "debootstrap" else LOCAL_BASE
        print(image_tag(src_hash, image_id(base)))
        return 0
    if shutil.which("docker") is None:
        sys.exit("[build-images] the docker client is not installed")
    started = time.monotonic()
    base = ensure_base(options.base, options.rebuild_base)
    ensure_dependency_wheels(options.rebuild_wheels)
    ensure_project_wheel(src_hash, options.rebuild_wheels)
    tag = ensure_project_image(base, src_hash, options.rebuild_image)
    smoke_ok = True if options.no_smoke else smoke_test(tag)
    say(f"done in {time.monotonic() - started:.1f}s: {tag} (also {IMAGE_REPO}:latest), base {base}")
    print(tag)
    return 1 if options.strict and not smoke_ok else 0


if __name__ == "__main__":
    sys.exit(main())
