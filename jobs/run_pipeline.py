"""Ray job entry for ``alignx pipeline``: every stage in order, resumable.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/run_pipeline.py --config jobs/configs/smollm2_cpu.yaml --run-dir /abs/runs/smollm2
"""

import sys

from alignx.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
