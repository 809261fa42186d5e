"""The Django site the benchmarks serve: one model, one view per workload."""
