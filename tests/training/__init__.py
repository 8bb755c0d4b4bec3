"""Tests of the training side (featstore.training)."""
