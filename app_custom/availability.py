"""Which rounds each site takes part in, from a schedule like {"site-2": "0-2,5,7-"}: plain parsing,
shared by the configuration check (cxrfl) and the simulated sites that come and go."""

from __future__ import annotations


def parse_rounds(spec: str, rounds: int) -> set[int]:
    """Rounds a site takes part in, from "0-2,5,7-" (an open end runs to the last round)."""
    chosen: set[int] = set()
    for part in str(spec).replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = part.split("-", 1)
                chosen.update(range(int(lo), (int(hi) if hi else rounds - 1) + 1))
            else:
                chosen.add(int(part))
        except ValueError:
            raise ValueError(f"round range {part!r}: use numbers like 0-2,5,7-") from None
    outside = sorted(r for r in chosen if not 0 <= r < rounds)
    if outside:
        raise ValueError(f"rounds {outside} are outside 0..{rounds - 1}")
    return chosen


def check_schedule(schedule: dict[str, str], sites: list[str], rounds: int) -> dict[str, set[int]]:
    """Each site's rounds (all rounds for a site the schedule leaves out); every round needs a site."""
    unknown = sorted(set(schedule) - set(sites))
    if unknown:
        raise ValueError(f"the schedule names sites that are not in the job: {', '.join(unknown)}")
    plan = {site: parse_rounds(schedule[site], rounds) if site in schedule else set(range(rounds)) for site in sites}
    empty = [r for r in range(rounds) if not any(r in taken for taken in plan.values())]
    if empty:
        raise ValueError(f"no site is available in round(s) {empty}")
    return plan
