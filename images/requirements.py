"""Print the requirements of the wrpo package for the given extras, one a line, from pyproject.toml.

    python requirements.py PYPROJECT EXTRA...

The images install these (with requirements/constraints.txt) in a layer of their own, before the
package's source is copied in, so a source change rebuilds only the last small layer.
Self-references such as `wrpo[operator,train]` are expanded; stdlib only (runs in the bare base image).
"""

from __future__ import annotations

import re
import sys
import tomllib


def requirements(pyproject: dict, extras: list[str]) -> list[str]:
    project = pyproject["project"]
    name = project["name"]
    out: list[str] = list(project["dependencies"])
    seen: set[str] = set()
    todo = list(extras)
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        if extra not in project["optional-dependencies"]:
            raise SystemExit(f"requirements.py: no extra {extra!r} in pyproject.toml")
        for req in project["optional-dependencies"][extra]:
            m = re.fullmatch(rf"{re.escape(name)}\[([^\]]+)\]", req.replace(" ", ""))
            if m:
                todo.extend(m.group(1).split(","))
            elif req not in out:
                out.append(req)
    return out


if __name__ == "__main__":
    with open(sys.argv[1], "rb") as f:
        print("\n".join(requirements(tomllib.load(f), sys.argv[2:])))
