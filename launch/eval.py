#!/usr/bin/env python
"""Offline kNN evaluation of a student (k = 20 and k = 1, T = 0.07; top-1/top-5) as a submitit job.

    python launch/eval.py source.checkpoint=runs/seed-1a2b3c4d                 # data from the run
    python launch/eval.py source.checkpoint=export/resnet18.pt data=imagenet cluster=slurm nodes=2
    python launch/eval.py source.checkpoint=seed_r18.pth source.arch=resnet18 data=imagenet knn.k=[20,200]

Each rank extracts its share of the train and val feature chunks (centre view, knn.batches_per_chunk
batches each); a preempted job resumes from the chunks already on disk. Rank 0 runs the chunked
search and writes <run>/results.json (section knn). Config: conf/eval.yaml
(seed_cluster.eval_config.EvalConfig); print it with --cfg.
"""

import sys

from seed_cluster.evaluate import launch

if __name__ == "__main__":
    sys.exit(launch(sys.argv[1:], "knn"))
