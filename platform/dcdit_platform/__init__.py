"""Orchestration for dcdit: Ray Train/Tune, MLflow tracking, storage, evaluation and reports."""
