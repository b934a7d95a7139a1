"""Results: what a run keeps and shows. The store (Optuna RDB, checkpoints, the summary kept as
it commits), Pareto sets and hypervolume, status, the report, export to Hugging Face folders,
and MLflow mirroring."""
