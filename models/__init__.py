"""Pure torch/transformers/pandas code: data preparation, models, losses, training, metrics.

Nothing here imports prefect or mlflow (a test enforces it), so it runs and tests anywhere.
"""
