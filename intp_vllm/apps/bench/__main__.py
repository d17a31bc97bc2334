"""`python -m intp_vllm.apps.bench`: `intp-vllm bench` without the console script."""

import argparse

from intp_vllm.apps import bench
from intp_vllm.apps.bench.cli import add_bench_arguments, main_bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(parser)
    main_bench(parser.parse_args())
