"""Benchmarks. Installed as `fastchat_core.bench` (setup.py maps this folder): run them as
`python -m fastchat_core.bench.bench_serving` etc.; results are committed under bench/results/."""
