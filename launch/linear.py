#!/usr/bin/env python
"""Linear evaluation of a student (SEED protocol: frozen backbone, 100 epochs, lr 30 x batch/256) via submitit.

    python launch/linear.py source.checkpoint=runs/seed-1a2b3c4d cluster=slurm
    python launch/linear.py source.checkpoint=seed_effb0.pth source.arch=efficientnet_b0 data=imagenet
    python launch/linear.py source.checkpoint=runs/x linear.epochs=10 linear.milestones=[6,8] cluster=local

Preemptible and resumable like training (resubmitting the same command continues it).
Top-1/top-5 per epoch go to TensorBoard (<eval dir>/tensorboard), linear_results.json and
<run>/results.json (section linear). Config: conf/eval.yaml; print it with --cfg.
"""

import sys

from seed_cluster.evaluate import launch

if __name__ == "__main__":
    sys.exit(launch(sys.argv[1:], "linear"))
