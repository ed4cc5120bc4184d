"""Demo churn models served by a local PyTriton/Triton server, for tests and local runs."""
