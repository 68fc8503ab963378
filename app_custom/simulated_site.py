"""The simulator's site script: the cxr-fl client (`app_custom/cxrfl_client.py`) with what only sites
simulated on one machine need. Only a simulator job runs it (`cxrfl.fl.job.build_job(simulated=True)`);
a production job never contains it.

Its settings are the simulator workspace's `local/cxrfl_simulation.json` (the simulator copies local/
into every site), all optional (its torch threads, like a production site's, are in `local/cxrfl_site.json`):
- "turn_lock": a lock file the sites take turns on, one task at a time, each with all the cores
- "schedule" ({site: "0-2,5"}) and "rounds": the rounds each listed site takes part in; away, a site
  sends the empty update the server counts as absent
"""

from __future__ import annotations

import contextlib
import fcntl

from app_custom.availability import parse_rounds
from app_custom.cxrfl_client import JOB_CUSTOM, SiteHooks, main as client_main
from app_custom.site_files import SIMULATION_CONFIG, local_settings


@contextlib.contextmanager
def machine_turn(lock_path: str | None):
    """Hold the machine for one task (no-op without a lock file). Sites simulated on one machine
    stay alive as processes (no per-round start-up) yet never compete for its cores."""
    if not lock_path:
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def simulated_hooks(settings: dict) -> SiteHooks:
    schedule, rounds = settings.get("schedule") or {}, settings.get("rounds")

    def away(site, input_model) -> bool:
        # the job's round count: a resumed job's server counts only the rounds left
        return site in schedule and input_model.current_round not in parse_rounds(
            schedule[site], rounds or input_model.total_rounds)

    return SiteHooks(task_turn=lambda: machine_turn(settings.get("turn_lock")), away=away)


def main() -> None:
    _, settings = local_settings(SIMULATION_CONFIG, JOB_CUSTOM)
    client_main(simulated_hooks(settings))


if __name__ == "__main__":
    main()
