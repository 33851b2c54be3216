"""Using a trained run: scoring new rows (predict.py) and exporting the model (export.py)."""
