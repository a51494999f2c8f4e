"""seed-cluster: SEED self-supervised distillation at cluster scale."""
