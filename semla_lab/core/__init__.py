"""Pure maths and process plumbing at the bottom of the package: errors, threads and devices, where jobs run, metrics, retrieval and fusion maths."""
