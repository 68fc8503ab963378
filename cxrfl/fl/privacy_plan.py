"""DP-SGD's plan for every site of a job whose data lies on this machine (simulator, POC): each site's
sample rate, noise multiplier and planned epsilon, checked before anything starts. A production site,
whose data the orchestrator cannot see, makes the same check itself when it starts (app_custom/cxrfl_client.py)."""

from __future__ import annotations

from cxrfl.fl.config import FLConfig
from lightning_modules.data.manifest import load_split


def site_privacy_plans(cfg: FLConfig) -> dict[str, dict]:
    """{site: plan} for a DP-SGD job ({} otherwise); raises ConfigError (PrivacyBudgetError) naming the first
    site whose plan would exceed --target-epsilon, or whose --delta is too large for its data."""
    if not cfg.dp_sgd or cfg.data_root is None:
        return {}
    from lightning_modules.privacy import plan_for  # lazy: Opacus only for DP-SGD jobs

    plans = {}
    for site in cfg.sites:
        n = len(load_split(cfg.data_root, "train", [site]))
        n = min(n, cfg.limit) if cfg.limit else n
        plans[site] = plan_for(cfg, n, who=f"site {site} ({n} training images)").as_dict()
    return plans
