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
