"""NVFlare job: federated pathology classification on the lung region of interest (masks from a segmentation model).

ScatterAndGather runs the rounds; every site runs app_custom/cxrfl_client.py, which trains the
plain LightningModule from lightning_modules/ under the Lightning Client API. The options are
those of `cxrfl sim` (see --help).

    python jobs/roi/job.py --data data/synthetic --export-dir /tmp/jobs     # then: nvflare job submit -j /tmp/jobs/cxrfl_roi
    python jobs/roi/job.py --data data/synthetic --simulate /tmp/sim-ws     # NVFlare simulator, one client per site
"""

from cxrfl.fl.job import job_main

if __name__ == "__main__":
    job_main("roi", __doc__)
