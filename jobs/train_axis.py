"""Ray job, Stage 1b: LoRA experts with Ray Train + DeepSpeed (one TorchTrainer per axis).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train_axis.py --config jobs/configs/smollm2_cpu.yaml --run-dir runs/smollm2 --axis honesty
    # all axes concurrently, plus the multi-task baseline:
    ray job submit ... -- python jobs/train_axis.py --config ... --run-dir ... --all --multitask

Inside a Ray job the trainers attach to the job's cluster (``ray.init()`` finds it).
"""

import sys

from alignx.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
