"""Where a site's scripts find their own settings and data. The file names are shared with the job
builder (`cxrfl`); both files live in the site's workspace, never in a job."""

from __future__ import annotations

import json
from pathlib import Path

from lightning_modules.data.manifest import MANIFEST_NAME

# The site's own data: {"data_dir": "/path/to/this/site"} in a kit, or {"data_root": "/path"} (one
# folder per site name) in a simulator workspace, which copies its local/ into every site. Optional
# "torch_threads": N, the CPU threads the site trains with (sites sharing one machine's cores).
SITE_CONFIG = Path("local") / "cxrfl_site.json"
# Simulator workspaces only (app_custom/simulated_site.py): turn lock, availability schedule.
SIMULATION_CONFIG = Path("local") / "cxrfl_simulation.json"


class SiteConfigError(RuntimeError):
    """The site cannot find or read its settings or data; an exception (not sys.exit), so NVFlare's
    task runner logs the message and the coordinator can name it (sys.exit ends its thread silently)."""


def local_settings(name: Path, start: Path) -> tuple[Path | None, dict]:
    """A site workspace's settings file (`name`, e.g. SITE_CONFIG), found in a folder above `start`."""
    for path in (folder / name for folder in [start, *start.parents]):
        if path.is_file():
            try:
                return path, json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise SiteConfigError(f"cxrfl client: {path}: unreadable site configuration ({exc})") from None
    return None, {}


def site_data_dir(config_path: Path | None, config: dict, site: str) -> Path:
    """The site's data folder (the one with its manifest.csv) from its SITE_CONFIG."""
    if config.get("data_dir"):
        site_dir, where = Path(config["data_dir"]), f"data_dir in {config_path}"
    elif config.get("data_root"):
        site_dir = Path(config["data_root"]) / site
        where = f"the data root in {config_path} must hold one folder per site name"
    else:
        raise SiteConfigError(f"cxrfl client {site}: no data configured: put {{\"data_dir\": ...}} in the site's {SITE_CONFIG}")
    if not (site_dir / MANIFEST_NAME).is_file():
        raise SiteConfigError(f"cxrfl client {site}: no data for this site: {site_dir / MANIFEST_NAME} does not exist ({where})")
    return site_dir


def site_torch_threads(config_path: Path | None, config: dict) -> int | None:
    """The site's "torch_threads" (a whole number >= 1), or None when it does not set one (torch's
    default: every core). Sites that share a machine each need their share of its cores: more OpenMP
    threads than cores stall one another's training (a POC's sites ran 4x slower per round)."""
    threads = config.get("torch_threads")
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise SiteConfigError(f"cxrfl client: {config_path}: torch_threads must be a whole number >= 1, "
                              f"got {threads!r}")
    return threads
