"""The tool registry (no server needed) and the image build's host check."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import pytest

from cronium_nb.tools import ToolError, ToolRegistry
from tests.conftest import REPO_ROOT, SLOWEST_FIRST


def call(registry: ToolRegistry, name: str, arguments: object) -> object:
    return asyncio.run(registry.call(name, arguments))


def test_sync_and_async_tools_get_keyword_arguments() -> None:
    registry = ToolRegistry()
    registry.register("add", lambda a, b=1: a + b)

    @registry.register("greet", timeout=5)
    async def greet(name: str) -> str:
        return f"hi {name}"

    assert call(registry, "add", {"a": 2}) == 3
    assert call(registry, "greet", {"name": "x"}) == "hi x"
    assert registry.names == ["add", "greet"] and "add" in registry


@pytest.mark.parametrize(
    ("name", "arguments", "kind", "message"),
    [
        ("missing", {}, "unknown", "unknown tool 'missing' (known: boom, slow)"),
        ("boom", {}, "failed", "tool 'boom' failed: ZeroDivisionError: division by zero"),
        ("boom", [1], "bad_arguments", "tool 'boom': arguments must be a JSON object"),
        ("slow", {}, "timeout", "tool 'slow' did not answer within 0.2 s"),
    ],
)
def test_errors_name_the_tool_and_the_cause(name: str, arguments: object, kind: str, message: str) -> None:
    registry = ToolRegistry()
    registry.register("boom", lambda: 1 / 0)

    async def slow() -> None:
        await asyncio.Event().wait()

    registry.register("slow", slow, timeout=0.2)
    with pytest.raises(ToolError) as raised:
        call(registry, name, arguments)
    assert (raised.value.kind, str(raised.value)) == (kind, message)


@pytest.mark.parametrize("name", ["", "has space", "semi;colon", "x" * 65, 3])
def test_bad_names_and_timeouts_are_refused_at_registration(name: object) -> None:
    with pytest.raises(ValueError, match="invalid tool name"):
        ToolRegistry().register(name, print)  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf")])
def test_bad_timeouts_are_refused(timeout: float) -> None:
    with pytest.raises(ValueError, match="tool timeout"):
        ToolRegistry().register("ok", print, timeout=timeout)


@pytest.fixture
def build_images():
    """sshd-fixtures/build_images.py as a module."""
    sys.path.insert(0, str(REPO_ROOT / "sshd-fixtures"))
    try:
        import build_images
    finally:
        sys.path.pop(0)
    return build_images


def test_the_image_build_names_missing_host_packages(build_images, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    foreign = "arm64" if build_images.HOST_ARCH == "amd64" else "amd64"
    with pytest.raises(SystemExit, match=r"missing host packages arch-test, docker\.io, mmdebstrap"):
        build_images.check_build_host({build_images.HOST_ARCH, foreign})
    with pytest.raises(SystemExit, match=r"missing host packages docker\.io, mmdebstrap \("):
        build_images.check_build_host({build_images.HOST_ARCH})


def test_the_image_build_installs_packages_only_inside_the_tree(build_images) -> None:
    """mmdebstrap runs its hooks as root on this machine: apt or dpkg called from a hook without
    ``chroot "$1"`` or apt's ``DPkg::Chroot-Directory`` installs on this machine (it happened
    once, with apt's config pointed at the tree: apt resolved against the tree, dpkg installed
    here)."""
    package_tools = re.compile(r"(?:^|[\s;&|(/])(?:apt|apt-get|dpkg|aptitude)(?:\s|$)")  # as a command
    assert build_images.HOST_APT_IN_TREE.endswith('-oDPkg::Chroot-Directory="$1"')
    # the whole hook is one install into the tree: nothing chained after it
    in_tree = re.escape(build_images.HOST_APT_IN_TREE) + r" install [\w .+-]+"
    for arch in build_images.SUITES:
        command = build_images.mmdebstrap_command(arch, Path("rootfs"), "bare.tar")
        hooks = [part.split("=", 1)[1] for part in command if re.match(r"--[a-z]+-hook=", part)]
        installs = [hook for hook in hooks if package_tools.search(hook)]
        assert all(re.fullmatch(in_tree, hook) for hook in installs), installs
        if "full" in build_images.arch_variants(arch):
            assert any(" install " in hook for hook in installs), hooks


def test_the_slowest_first_list_names_test_files_that_exist() -> None:
    """A renamed file would silently lose its place at the front of `make test`'s queue."""
    assert len(set(SLOWEST_FIRST)) == len(SLOWEST_FIRST)
    assert [name for name in SLOWEST_FIRST if not (REPO_ROOT / "tests" / name).is_file()] == []
