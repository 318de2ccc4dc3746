"""The measuring code: bench.py's throughput and memory rows and its GPU check
(bench.py --gpu-check), both timed on the trainer's own parts (training/)."""
