"""The search: a run config resolved and checked, the run folder created and opened, the
manager loop (ask, dispatch, commit, tell, checkpoint), the references it is measured against,
multi-fidelity racing, and the MAP surrogate."""
