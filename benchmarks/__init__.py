"""The benchmark suite: ``python -m benchmarks [--quick | --smoke | --full]`` (``make bench``).

Sections: engine (img/s, matmul ceilings, accuracy of reduced precision), http (live server),
search (FAISS indexes on clustered vectors), train (step throughput fp32 vs bf16). Every figure
that matters is a ratio measured within one run, because the machines are noisy.
"""
