"""Datasets: the [data] config, the loaders of each dataset, and batch loaders."""
