"""The fair ATSS vs ATSS + DyHead protocol on synthetic data, and the paper's
Table 1 ablation under it (docs/ab_study.md, docs/ablation_synthetic.md)."""
