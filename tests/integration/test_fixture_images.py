"""Image builds are cached by recipe hash: a second `make fixtures` builds nothing."""

from __future__ import annotations

import subprocess
import sys

import docker
import pytest

from cronium_nb.fleet import IMAGES, image_tag
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.fleet


def image_ids() -> dict[str, str]:
    client = docker.from_env()
    return {tag: client.images.get(tag).id for tag in (image_tag(a, v) for a, v in IMAGES)}


def test_second_make_fixtures_rebuilds_nothing() -> None:
    before = image_ids()
    result = subprocess.run(["make", "-s", "fixtures"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("cronium-sshd")]
    assert len(lines) == len(IMAGES)
    assert all(line.endswith(": up to date") for line in lines), result.stdout
    assert image_ids() == before
    check = subprocess.run(
        [sys.executable, "sshd-fixtures/build_images.py", "--check"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert (check.returncode, check.stdout.strip()) == (0, "all images up to date")


def test_images_carry_their_recipe_label() -> None:
    client = docker.from_env()
    for arch, variant in IMAGES:
        labels = client.images.get(image_tag(arch, variant)).labels
        assert labels["cronium.sshd.arch"] == arch
        assert labels["cronium.sshd.variant"] == variant
        tags = client.images.get(image_tag(arch, variant)).tags
        assert any(tag.endswith(labels["cronium.sshd.recipe"]) for tag in tags)


@pytest.mark.parametrize(("arch", "variant"), IMAGES)
def test_images_hold_what_their_variant_says_and_nothing_of_the_build(arch: str, variant: str) -> None:
    """The bare tree is saved in the middle of the build: mmdebstrap's stand-ins must not be in
    it (its policy-rc.d, its start-stop-daemon that only warns), and the full image's packages
    are added after it."""
    client = docker.from_env()
    script = (
        "test ! -e /usr/sbin/policy-rc.d && test ! -e /usr/sbin/start-stop-daemon.REAL && echo clean; "
        "head -c 4 /usr/sbin/start-stop-daemon | od -An -c | tr -d ' '; "
        "for p in python3 node sudo sshd; do command -v $p >/dev/null && echo has-$p; done; "
        "ls /var/lib/apt/lists"
    )
    output = client.containers.run(
        image_tag(arch, variant), ["-c", script], entrypoint="/bin/sh", remove=True, network_disabled=True
    ).decode()
    lines = output.split()
    assert "clean" in lines and "177ELF" in lines, output
    expected = {"has-sshd"} | ({"has-python3", "has-node", "has-sudo"} if variant == "full" else set())
    assert {line for line in lines if line.startswith("has-")} == expected, output
    assert "lock" in lines and "partial" in lines and not [line for line in lines if "_dists_" in line], output
