"""Stage 1 (train): one LoRA adapter per axis with Ray Train + DeepSpeed.

Modules, from the pure builders to the framework edge:

* :mod:`alignx.train.lora` — ``build_lora_config``: ``train.lora`` -> ``peft.LoraConfig``;
* :mod:`alignx.train.deepspeed` — ``build_deepspeed_config``: a plain DeepSpeed config dict
  (pure; never imports deepspeed);
* :mod:`alignx.train.engine` — ``init_engine`` and the ZeRO-aware save/load helpers (the only
  ``import deepspeed`` in the project);
* :mod:`alignx.train.loop` — ``train_loop_per_worker``, the code every Ray Train worker runs;
* :mod:`alignx.train.trainer` — ``train_axis`` / ``train_multitask`` / ``train_all``: builds the
  ``TorchTrainer``, runs it and publishes ``<run_dir>/adapters/<name>/`` with its manifest.

Nothing heavy is imported here, so ``import alignx.train`` is cheap.
"""
