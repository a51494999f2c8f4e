#!/bin/bash

# Parameters
#SBATCH --account=vision
#SBATCH --constraint=volta32gb
#SBATCH --cpus-per-task=10
#SBATCH --error=/runs/x/submitit/%j_0_log.err
#SBATCH --exclusive
#SBATCH --gpus-per-node=8
#SBATCH --job-name=seed
#SBATCH --mem=480GB
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --open-mode=append
#SBATCH --output=/runs/x/submitit/%j_0_log.out
#SBATCH --partition=gpu
#SBATCH --qos=high
#SBATCH --requeue
#SBATCH --signal=USR2@120
#SBATCH --time=4320
#SBATCH --wckey=submitit

# setup
export OMP_NUM_THREADS=10
module load cuda

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /runs/x/submitit/%j_%t_log.out --error /runs/x/submitit/%j_%t_log.err --kill-on-bad-exit=1 CMD
