"""Ray job: evaluate a run (deploy its app on Serve, generate, judge, report), or several base
models in parallel (one whole pipeline per model).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/evaluate.py --config jobs/configs/smollm2_cpu.yaml --run-dir /abs/runs/smollm2
    ray job submit ... -- python jobs/evaluate.py --config jobs/configs/mistral7b.yaml \
        --run-dir /shared/runs/paper --models mistral7b,gemma7b,deepseek7b,llama2_7b

Writes <run_dir>/eval/report.{json,md} and plots (with --models: <run_dir>/comparison.*).
"""

import sys

from alignx.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
