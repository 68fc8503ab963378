"""How a federated run went, besides its test metrics, in words: from its metrics.json (a failure,
sites that never contributed or missed rounds, an early stop, the privacy spent), for the terminal and
the report."""

from __future__ import annotations


def round_ranges(rounds: list[int]) -> str:
    """Round numbers as short ranges: [0, 1, 2, 5] -> "0-2, 5"."""
    spans: list[list[int]] = []
    for r in sorted(rounds):
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def privacy_notes(privacy) -> list[str]:
    """A run's privacy record (metrics.json `privacy`) in words: per site the epsilon after each round
    (federated) or the run's epsilon (central), with the mechanism; a filter without an epsilon says so."""
    if not isinstance(privacy, dict):
        return []
    mechanism = {"dpsgd": "DP-SGD", "svt": "SVT filter", "percentile": "percentile filter"}.get(
        privacy.get("mechanism"), str(privacy.get("mechanism")))
    epsilon = privacy.get("epsilon")
    if epsilon is None:
        return [f"privacy ({mechanism}): {privacy.get('guarantee')}"]
    target = f", target {privacy['target_epsilon']:g}" if isinstance(privacy.get("target_epsilon"), (int, float)) else ""
    how = f"({mechanism}, {privacy.get('accountant', 'rdp')} accountant, delta {privacy.get('delta')}{target})"
    if isinstance(epsilon, (int, float)):
        return [f"privacy {how}: epsilon spent {epsilon:.3f} over {privacy.get('steps')} steps"]
    lines = []
    for site, by_round in sorted((privacy.get("epsilon_by_round") or {}).items()):
        rounds = ", ".join(f"r{r} {e:.2f}" for r, e in by_round.items())
        lines.append(f"privacy {how} {site}: epsilon {epsilon.get(site, float('nan')):.3f} (after each round: {rounds})")
    return lines


def run_notes(metrics: dict) -> list[str]:
    """One line per fact a reader of the run must see: why it failed; otherwise the sites that never
    contributed an accepted update, each site that missed rounds, an early stop, and what privacy the
    run spent (privacy_notes). [] for a run in which every site contributed in every round it was
    expected in and that used no privacy mechanism."""
    if metrics.get("status") == "failed":
        return [f"FAILED: {metrics.get('error') or 'no reason recorded'}"]
    notes = []
    never = metrics.get("missing_sites") or []
    if never:
        notes.append(f"never contributed an accepted update (completed with --allow-missing-sites): {', '.join(never)}")
    contributed = metrics.get("rounds_contributed") or {}
    for site, missing in sorted((metrics.get("sites_missing_rounds") or {}).items()):
        if site not in never:
            done = contributed.get(site)
            of = f" ({done} of {done + len(missing)} contributed)" if isinstance(done, int) else ""
            notes.append(f"{site} missed round(s) {round_ranges(missing)}{of}")
    stopped = metrics.get("stopped_early")
    if isinstance(stopped, dict):
        metric = stopped.get("key_metric") or "validation metric"
        best = stopped.get("best_round")
        of = f" of rounds 0-{stopped['rounds'] - 1}" if isinstance(stopped.get("rounds"), int) else ""
        of_model = f", of round {best - 1}'s global model" if isinstance(best, int) else ""
        notes.append(f"stopped early after round {stopped.get('round')}{of}: the sites' {metric} had not improved "
                     f"for {stopped.get('patience')} round(s) (best: their validation in round {best}{of_model})")
    return notes + privacy_notes(metrics.get("privacy"))
