"""NVFlare job: federated lung segmentation (MONAI U-Net, Dice/IoU/HD95).

ScatterAndGather runs the rounds; every site runs app_custom/cxrfl_client.py, which trains the
plain LightningModule from lightning_modules/ under the Lightning Client API. The options are
those of `cxrfl sim` (see --help).

    python jobs/segment/job.py --data data/synthetic --export-dir /tmp/jobs     # then: nvflare job submit -j /tmp/jobs/cxrfl_segment
    python jobs/segment/job.py --data data/synthetic --simulate /tmp/sim-ws     # NVFlare simulator, one client per site
"""

import argparse

from cxrfl.commands.fl_options import add_fl_options, config_from_args
from cxrfl.fl_job import build_job, from_package_root

TASK = "segment"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fl_options(parser, task=TASK)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--export-dir", help="write the job folder here")
    target.add_argument("--simulate", metavar="WORKSPACE", help="run the job in the NVFlare simulator")
    args = parser.parse_args()
    cfg = config_from_args(args)
    with from_package_root():
        job = build_job(cfg)
        if args.export_dir:
            job.export_job(args.export_dir)
        else:
            job.simulator_run(args.simulate, clients=cfg.sites, threads=len(cfg.sites))


if __name__ == "__main__":
    main()
