"""What merges learn from data: the calibration statistics of the data-aware methods, DAM and
AdaMerging coefficients trained on a run config's models and data, and the guard that keeps
held-out documents out of both."""
