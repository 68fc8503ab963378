"""The NVFlare timings every cxr-fl job carries, named in one place (seconds; `build_job` uses them).

Each differs from NVFlare's default only where the comment says so and why; the others are NVFlare's
own defaults, written out so that an exported job states what it waits for.
"""

# Cross-site evaluation: how long the server waits for each site to send its own model (NVFlare's
# default) and for the validations of every model on every site (NVFlare's default; DenseNet121 on a
# large validation split takes minutes on a CPU site, so not shorter).
SUBMIT_MODEL_TIMEOUT = 600
VALIDATION_TIMEOUT = 6000

# How often a site asks for its next task (NVFlare: 2 s): each round and each cross-site validation
# starts up to 1.5 s sooner, for polling that a handful of sites cannot notice.
TASK_REQUEST_INTERVAL = 0.5

# A site that dies is written off as soon as the server hears of it (NVFlare waits 60 s more), and a
# task that waits only on dead sites gives up this long after it was sent (NVFlare: 30 s): a round
# with --min-clients below the number of sites goes on without a crashed site.
DEAD_CLIENT_GRACE_PERIOD = 0
DEAD_CLIENT_CHECK_LEAD_TIME = 10


def server_params() -> dict:
    """The server's job parameters (config_fed_server.json) these settings set."""
    return {"dead_client_grace_period": DEAD_CLIENT_GRACE_PERIOD,
            "dead_client_check_lead_time": DEAD_CLIENT_CHECK_LEAD_TIME,
            "server": {"task_request_interval": TASK_REQUEST_INTERVAL}}
