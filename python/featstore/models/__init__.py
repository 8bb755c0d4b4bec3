"""PyTorch models whose outputs featstore caches (importing this package imports torch)."""
