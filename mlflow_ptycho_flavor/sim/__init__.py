"""Optional science around the models: the NPZ dataset schema and I/O, a seeded simulator and its forward physics,
a short physics-informed trainer, reconstruction metrics and plotting. Never imports the MLflow layer (the trainer
logs into an active MLflow run when one exists, importing MLflow lazily)."""
