"""NVFlare job: federated lung segmentation (MONAI U-Net, Dice/IoU/HD95).

ScatterAndGather runs the rounds; every site runs app_custom/cxrfl_client.py, which trains the
plain LightningModule from lightning_modules/ under the Lightning Client API. The options are
those of `cxrfl sim` (see --help).

    python jobs/segment/job.py --data data/synthetic --export-dir /tmp/jobs     # then: nvflare job submit -j /tmp/jobs/cxrfl_segment
    python jobs/segment/job.py --data data/synthetic --simulate /tmp/sim-ws     # NVFlare simulator, one client per site
"""

from cxrfl.fl.job import job_main

if __name__ == "__main__":
    job_main("segment", __doc__)
