"""Developer tools (benchmarks, the allocation tracker, the workflow renderer); not needed to run the method."""
