"""The Dockerfiles install exactly what CI installs (scripts/install.sh), pinned, as a non-root user."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGES = {
    "operator/Dockerfile": "operator",
    "runtime/Dockerfile": "train",
    "runtime/Dockerfile.cpu": "train",
}


@pytest.mark.parametrize("name,extras", IMAGES.items())
def test_dockerfile(name, extras):
    text = (ROOT / "images" / name).read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert re.search(r":\d+\.\d+\.\d+", base) and "latest" not in base, base  # a pinned tag
    assert f"bash /src/scripts/install.sh {extras}" in text
    assert re.search(r"^USER 1000", text, re.M)
    assert (ROOT / "scripts" / "install.sh").exists() and (ROOT / "requirements" / "constraints.txt").exists()


def test_operator_image_has_no_torch():
    text = (ROOT / "images" / "operator" / "Dockerfile").read_text()
    assert "'torch' not in sys.modules" in text and "install.sh train" not in text
