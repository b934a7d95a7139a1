"""Learned merges: DAM and AdaMerging coefficients trained on a run config's models and data."""
