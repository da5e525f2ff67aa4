"""Print the project's pinned requirements from pyproject.toml, one per line (for pip -r).

    python scripts/requirements.py [--dev]

pyproject.toml is the one list of what the CPU environment needs; `make install` feeds it to pip
without building the project as a package (it is a flat set of modules Cog loads by path).
"""

import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
requirements = project["dependencies"] + (project["optional-dependencies"]["dev"] if "--dev" in sys.argv else [])
sys.stdout.write("\n".join(requirements) + "\n")
