"""Build the runner: the universal zipapp and the standalone amd64/arm64 bundles.

``runner/dist/`` receives, each with a ``.sha256`` file beside it:

- ``cronium-runner.pyz``: a zipapp for any server with python3 >= 3.8 (PyYAML included, pure Python),
  and ``cronium-runner-zipapp.tar.gz``, the same packed for deployment;
- ``cronium-runner-linux-{amd64,arm64}.tar.gz``: a PyInstaller one-folder bundle that needs no
  Python on the server, built inside a Debian bullseye container of that architecture (arm64
  emulated), so it runs with glibc >= 2.31.

Deployable archives hold ``cronium-runner/`` and ``cronium-runner/SHA256SUMS`` of its files.

Every artifact is cached by a hash of its inputs (runner sources, this recipe, pinned wheel
versions) and rebuilt only when that hash changes.

Usage: python runner/build/build_runner.py [--arch amd64,arm64] [--no-bundles]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipapp
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNNER_ROOT = HERE.parent
SOURCE = RUNNER_ROOT / "cronium_runner"
DIST = RUNNER_ROOT / "dist"
WHEEL_CACHE = RUNNER_ROOT / ".build-cache" / "wheels"
ARCHES = {"amd64": "x86_64", "arm64": "aarch64"}  # Docker/Debian name -> manylinux machine name
BUILDER_SUITE = "bullseye"  # glibc 2.31: the bundles run on servers with glibc >= 2.31
BUILDER_PACKAGES = ["python3", "python3-pip", "libpython3.9", "binutils"]
# importlib-metadata and zipp are PyInstaller dependencies on Python < 3.10, which `pip download` for
# another Python version does not resolve by itself.
PINNED_WHEELS = ["pyinstaller==6.22.3", "pyyaml==6.0.3", "importlib-metadata==8.7.1", "zipp==3.23.1"]
BUILDER_HOOKS = (  # mmdebstrap customize hooks; {wheels} is the host folder of downloaded wheels
    'mkdir -p "$1"/tmp/wheels && cp {wheels}/*.whl "$1"/tmp/wheels/',
    'chroot "$1" env -u PIP_FIND_LINKS python3 -m pip install -q --no-index --find-links /tmp/wheels {pinned}',
    'rm -rf "$1"/tmp/wheels "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*',
)
BUILDER_PYTHON = "3.9"
ZIPAPP_NAME = "cronium-runner.pyz"
ZIPAPP_ARCHIVE = "cronium-runner-zipapp.tar.gz"  # the zipapp as the executor deploys it
DEPLOY_TOP = "cronium-runner"
SUMS_NAME = "SHA256SUMS"
MIN_ZIPAPP_PYTHON = (3, 8)


def bundle_name(arch: str) -> str:
    return f"cronium-runner-linux-{arch}.tar.gz"


def _digest(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:16]


def source_files() -> list[Path]:
    return sorted(p for p in SOURCE.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def sources_hash() -> str:
    return _digest(*(str(p.relative_to(SOURCE)).encode() + p.read_bytes() for p in source_files()))


def _write_artifact(name: str, data: bytes, input_hash: str) -> str:
    DIST.mkdir(parents=True, exist_ok=True)
    (DIST / name).write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    (DIST / f"{name}.sha256").write_text(f"{sha}  {name}\n")
    (DIST / f"{name}.input-hash").write_text(input_hash + "\n")
    return sha


def _up_to_date(name: str, input_hash: str) -> bool:
    stamp = DIST / f"{name}.input-hash"
    return (DIST / name).is_file() and stamp.is_file() and stamp.read_text().strip() == input_hash


# --- zipapp -----------------------------------------------------------------------------------


def build_zipapp() -> str:
    import yaml

    yaml_dir = Path(yaml.__file__).parent
    input_hash = _digest(sources_hash().encode(), (HERE / "build_runner.py").read_bytes(), yaml.__version__.encode())
    if _up_to_date(ZIPAPP_NAME, input_hash) and _up_to_date(ZIPAPP_ARCHIVE, input_hash):
        return f"{ZIPAPP_NAME}: up to date"
    with tempfile.TemporaryDirectory(prefix="cronium-zipapp-") as staging_name:
        staging = Path(staging_name)
        shutil.copytree(SOURCE, staging / "cronium_runner", ignore=shutil.ignore_patterns("__pycache__"))
        # Pure-Python PyYAML: the C extension is built for this machine, not for the servers.
        shutil.copytree(yaml_dir, staging / "yaml", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        (staging / "__main__.py").write_text("import sys\nfrom cronium_runner.cli import main\nsys.exit(main())\n")
        target = io.BytesIO()
        zipapp.create_archive(staging, target, interpreter="/usr/bin/env python3", compressed=True)
    sha = _write_artifact(ZIPAPP_NAME, target.getvalue(), input_hash)
    (DIST / ZIPAPP_NAME).chmod(0o755)
    with tempfile.TemporaryDirectory(prefix="cronium-zipapp-deploy-") as folder:
        shutil.copy2(DIST / ZIPAPP_NAME, Path(folder) / ZIPAPP_NAME)
        _write_artifact(ZIPAPP_ARCHIVE, deploy_archive(Path(folder)), input_hash)
    return f"{ZIPAPP_NAME}: built ({len(target.getvalue())} bytes, sha256 {sha[:12]})"


# --- bundles ----------------------------------------------------------------------------------


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def _wheels(arch: str) -> Path:
    """Wheels for the builder's Python, downloaded on the host (no TLS needed in the container)."""
    folder = WHEEL_CACHE / arch
    stamp = folder / "pinned.txt"
    if stamp.is_file() and stamp.read_text() == "\n".join(PINNED_WHEELS):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    abi = "cp" + BUILDER_PYTHON.replace(".", "")
    _run(
        [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(folder),
         "--platform", f"manylinux2014_{ARCHES[arch]}", "--python-version", BUILDER_PYTHON,
         "--implementation", "cp", "--abi", abi, *PINNED_WHEELS],
        f"downloading wheels for {arch}",
    )  # fmt: skip
    stamp.write_text("\n".join(PINNED_WHEELS))
    return folder


def debian_mirror() -> str:
    """The host's own Debian mirror (from its apt sources), so that no address is written here.

    The builder uses only the release's main suite: this machine's package proxy does not serve
    bullseye-security for arm64, and a build environment does not need it."""
    for sources in sorted(Path("/etc/apt").glob("sources.list.d/*.sources")):
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    sources_list = Path("/etc/apt/sources.list")
    if sources_list.is_file():
        for line in sources_list.read_text().splitlines():
            parts = line.split()
            if parts[:1] == ["deb"] and "security" not in line:
                return next(part for part in parts[1:] if "://" in part)
    return "http://deb.debian.org/debian"


def builder_image(arch: str) -> str:
    """A bullseye image of ``arch`` with PyInstaller; built once per recipe hash."""
    recipe = _digest(f"{BUILDER_SUITE}/{arch}/{BUILDER_PACKAGES}/{PINNED_WHEELS}/{BUILDER_HOOKS}".encode())
    tag = f"cronium-runner-builder:{arch}-{recipe}"
    if subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0:
        return tag
    wheels = _wheels(arch)
    with tempfile.TemporaryDirectory(prefix="cronium-builder-") as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        hooks = [hook.format(wheels=wheels, pinned=" ".join(PINNED_WHEELS)) for hook in BUILDER_HOOKS]
        _run(
            ["mmdebstrap", "--quiet", "--variant=apt", f"--architectures={arch}",
             f"--include={','.join(BUILDER_PACKAGES)}", *(f"--customize-hook={hook}" for hook in hooks),
             BUILDER_SUITE, str(rootfs), f"deb {debian_mirror()} {BUILDER_SUITE} main"],
            f"mmdebstrap of the {arch} builder",
        )  # fmt: skip
        _run(["docker", "import", str(rootfs), tag], f"docker import of the {arch} builder")
    return tag


def deploy_archive(folder: Path) -> bytes:
    """A deterministic tar.gz of ``folder`` under the top directory ``cronium-runner/``, with a
    ``SHA256SUMS`` of every regular file, so that the server can verify a deployment with
    ``sha256sum -c`` and nothing else."""
    paths = sorted(folder.rglob("*"))
    sums = "".join(
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  ./{p.relative_to(folder)}\n"
        for p in paths
        if p.is_file() and not p.is_symlink()
    ).encode()
    tar_buffer = io.BytesIO()
    with tarfile.open(fileobj=tar_buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:

        def normalized(info: tarfile.TarInfo) -> tarfile.TarInfo:
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            return info

        for path in paths:
            info = normalized(archive.gettarinfo(str(path), arcname=f"{DEPLOY_TOP}/{path.relative_to(folder)}"))
            if info.isfile():
                with path.open("rb") as stream:
                    archive.addfile(info, stream)
            else:
                archive.addfile(info)
        info = normalized(tarfile.TarInfo(f"{DEPLOY_TOP}/{SUMS_NAME}"))
        info.size, info.mode = len(sums), 0o644
        archive.addfile(info, io.BytesIO(sums))
    gz_buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=gz_buffer, mtime=0) as compressed:
        compressed.write(tar_buffer.getvalue())
    return gz_buffer.getvalue()


def build_bundle(arch: str) -> str:
    name = bundle_name(arch)
    input_hash = _digest(
        sources_hash().encode(), (HERE / "build_runner.py").read_bytes(), (HERE / "entry.py").read_bytes()
    )
    if _up_to_date(name, input_hash):
        return f"{name}: up to date"
    started = time.monotonic()
    image = builder_image(arch)
    with tempfile.TemporaryDirectory(prefix=f"cronium-bundle-{arch}-") as out:
        script = (
            "set -e; cp -r /src /tmp/src; cd /tmp/src; "
            "python3 -m PyInstaller --noconfirm --onedir --name cronium-runner --paths /tmp/src "
            "--add-data /tmp/src/cronium_runner/resources:cronium_runner/resources "
            "--distpath /tmp/dist --workpath /tmp/work --specpath /tmp/work build_entry.py >/tmp/log 2>&1 "
            "|| { tail -40 /tmp/log; exit 1; }; cp -r /tmp/dist/cronium-runner /out/; chmod -R a+rX /out"
        )
        with tempfile.TemporaryDirectory(prefix="cronium-src-") as src:
            shutil.copytree(SOURCE, Path(src) / "cronium_runner", ignore=shutil.ignore_patterns("__pycache__"))
            shutil.copy(HERE / "entry.py", Path(src) / "build_entry.py")
            _run(
                ["docker", "run", "--rm", "--network", "none", "-v", f"{src}:/src:ro", "-v", f"{out}:/out",
                 image, "sh", "-c", script],
                f"PyInstaller build for {arch}",
            )  # fmt: skip
        data = deploy_archive(Path(out) / "cronium-runner")
    sha = _write_artifact(name, data, input_hash)
    return f"{name}: built in {time.monotonic() - started:.0f} s ({len(data)} bytes, sha256 {sha[:12]})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default=",".join(ARCHES))
    parser.add_argument("--no-bundles", action="store_true", help="build only the zipapp")
    args = parser.parse_args(argv)
    arches = [a for a in args.arch.split(",") if a]
    unknown = set(arches) - set(ARCHES)
    if unknown:
        parser.error(f"unknown architecture(s) {', '.join(sorted(unknown))}; known: {', '.join(ARCHES)}")
    print(f"cronium-runner {build_zipapp()}", flush=True)
    if not args.no_bundles:
        with ThreadPoolExecutor(max_workers=2) as pool:
            for line in pool.map(build_bundle, arches):
                print(f"cronium-runner {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
