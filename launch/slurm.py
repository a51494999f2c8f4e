#!/usr/bin/env python
"""Run a SEED (or MoCo-v2) training job on SLURM, or on this machine with cluster=local.

    python launch/slurm.py nodes=4 student=mobilenetv3_large data.train=/data/imagenet/train.beton \
        teacher.checkpoint=/ckpt/resnet50_mocov2.pth
    python launch/slurm.py cluster=local data=fashion_mnist student=convnet_s ...

Overrides are Hydra's: `group=option` picks a preset from conf/, `key=value` sets one field.
Prints the job id, run directory, log paths and the TensorBoard command.
"""

import sys

from seed_cluster.launcher import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
