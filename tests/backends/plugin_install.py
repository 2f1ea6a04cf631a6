"""Install a test backend plugin the way pip would: a package plus a dist-info naming its entry point.

The server finds it only through PYTHONPATH and the `tgserve.backends` entry-point group, exactly as
it finds a vendor's `pip install tgserve-foo`.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from tests.api.conftest import tgserve_env


def install_backend_plugin(site: Path, package: str, source: Path, backend: str) -> None:
    """Lay out `package` (its `plugin.py` copied from `source`) and its dist-info under `site`,
    declaring `backend = package.plugin` under `tgserve.backends`."""
    (site / package).mkdir(parents=True)
    (site / package / "__init__.py").write_text("")
    shutil.copy(source, site / package / "plugin.py")
    dist_info = site / f"{package}-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(f"[tgserve.backends]\n{backend} = {package}.plugin\n")


def env_with_site(site: Path) -> dict[str, str]:
    """The tests' server environment with `site` first on PYTHONPATH."""
    env = tgserve_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return env
