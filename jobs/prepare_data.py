"""Ray job, Stage 1a: raw data -> injected Parquet splits + a DataManifest per axis.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/prepare_data.py --config jobs/configs/smollm2_cpu.yaml --run-dir runs/smollm2
"""

import sys

from alignx.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
