"""Ray job, Stage 2: calibrate the MoCaE router (embeds with a Ray Data actor pool).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/calibrate_router.py --config jobs/configs/smollm2_cpu.yaml --run-dir /abs/runs/smollm2

Needs the run's trained adapters (`alignx train --all`); writes <run_dir>/router/.
"""

import sys

from alignx.cli import main

if __name__ == "__main__":
    sys.exit(main(["calibrate", *sys.argv[1:]]))
