"""The runner binaries `make runner` builds: static, small, one per architecture."""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

DIST = REPO_ROOT / "runner" / "dist"
ARCHES = json.loads((DIST / "runner.json").read_text())["binaries"] if (DIST / "runner.json").is_file() else {}
REQUIRED = ["amd64", "arm64", "riscv64"]  # the fleet's; `build_go.py --all` adds ppc64le and s390x
ELF_MACHINES = {"amd64": 62, "arm64": 183, "riscv64": 243, "ppc64le": 21, "s390x": 22}
PT_DYNAMIC, PT_INTERP = 2, 3


def program_header_types(path: Path) -> tuple[int, list[int]]:
    """The ELF machine and the type of every program header of a 64-bit ELF file."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2, f"{path.name} is not a 64-bit ELF file"
    order = "<" if data[5] == 1 else ">"
    machine = struct.unpack_from(order + "H", data, 18)[0]
    phoff = struct.unpack_from(order + "Q", data, 32)[0]
    entry_size, count = struct.unpack_from(order + "HH", data, 54)
    return machine, [struct.unpack_from(order + "I", data, phoff + i * entry_size)[0] for i in range(count)]


@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_each_binary_is_static_for_its_architecture_and_small(arch: str) -> None:
    binary = DIST / f"cronium-runner-linux-{arch}"
    machine, types = program_header_types(binary)
    assert machine == ELF_MACHINES[arch]
    assert PT_INTERP not in types and PT_DYNAMIC not in types  # no loader, no shared libraries
    assert len(gzip.compress(binary.read_bytes(), compresslevel=9)) <= 4 * 2**20


def test_the_build_info_names_every_binary_by_its_digest() -> None:
    info = json.loads((DIST / "runner.json").read_text())
    assert set(REQUIRED) <= set(info["binaries"])
    for arch, digest in info["binaries"].items():
        name = f"cronium-runner-linux-{arch}"
        assert hashlib.sha256((DIST / name).read_bytes()).hexdigest() == digest
        assert (DIST / f"{name}.sha256").read_text() == f"{digest}  {name}\n"
