"""The worker subprocess: the only package that imports mlx."""
