"""Foreign model formats in, standalone bundles out (TensorFlow archives, Lightning checkpoints). Never imports
MLflow."""
