"""Meta keys that travel with models between the sites and the server, and land in the run folder's
round log; plain names with no NVFlare import, so the orchestration that reads round logs needs none."""

ABSENT = "cxrfl_absent"  # meta flag of an update from a site that is away this round
FRESH, KEPT = "cxrfl_fresh_sites", "cxrfl_kept_sites"  # meta of the global model: who counted
LOCAL_SECONDS = "cxrfl_local_seconds"  # meta of an update: the site's time on the round's task
SUM_WEIGHT = "cxrfl_he_sum_of_weights"  # meta of an HE-summed model: what the sites divide the sum by
DP_EPSILON = "cxrfl_dp_epsilon"  # meta of a DP-SGD update: epsilon the site has spent so far (at DP_DELTA)
DP_DELTA = "cxrfl_dp_delta"
# NVFlare's SVTPrivacy filter (2.9) writes its own accounting into the update's meta under these names
SVT_ROUND_BUDGET, SVT_ACCOUNTANT = "svt_privacy_budget", "svt_privacy_accountant"
