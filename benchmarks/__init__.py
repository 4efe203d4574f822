"""Benchmark scripts (a package, so that `benchmarks.common` never resolves to a site-packages namesake)."""
