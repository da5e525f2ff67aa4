"""Print the project's pinned requirements from pyproject.toml, one per line (for pip -r).

    python scripts/requirements.py [--dev]

pyproject.toml is the one list of what the CPU environment needs; `make install` feeds it to pip
without building the project as a package (it is a flat set of modules Cog loads by path).
`--dev` (development and CI) adds the `dev` extra (test tools) and the `cluster` extra (Ray Serve,
for cluster/ and its tests). The Cog image installs only the base dependencies (cog.yaml).
"""

import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
extras = project["optional-dependencies"]
requirements = project["dependencies"] + (extras["dev"] + extras["cluster"] if "--dev" in sys.argv else [])
sys.stdout.write("\n".join(requirements) + "\n")
