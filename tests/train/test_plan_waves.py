from __future__ import annotations

from alignx.artifacts import MULTITASK
from alignx.config import ScalingCfg
from alignx.train.trainer import plan_waves

NAMES = ["helpfulness", "harmlessness", MULTITASK, "honesty"]


def test_everything_in_one_wave_when_it_fits():
    s = ScalingCfg(num_workers=1, cpus_per_worker=0.3)
    assert plan_waves(NAMES, s, {"CPU": 2.0}) == [NAMES]


def test_experts_first_then_multitask_when_the_cluster_is_small():
    s = ScalingCfg(num_workers=1, cpus_per_worker=0.6)  # 4 x 0.6 > 2 CPUs
    assert plan_waves(NAMES, s, {"CPU": 2.0}) == [
        ["helpfulness", "harmlessness", "honesty"], [MULTITASK]]


def test_gpus_bound_the_wave_size():
    s = ScalingCfg(num_workers=4, use_gpu=True, cpus_per_worker=4, gpus_per_worker=1)
    waves = plan_waves(NAMES, s, {"CPU": 64.0, "GPU": 8.0})
    assert waves == [["helpfulness", "harmlessness"], ["honesty", MULTITASK]]
    # a cluster too small for even one trainer still gets one per wave (Ray then waits/fails loudly)
    assert plan_waves(["honesty"], s, {"CPU": 1.0, "GPU": 0.0}) == [["honesty"]]
