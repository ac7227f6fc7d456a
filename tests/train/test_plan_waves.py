from __future__ import annotations

from alignx.artifacts import MULTITASK
from alignx.config import ScalingCfg
from alignx.train.trainer import plan_waves, wave_cpus_per_worker

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


def _tc(**kw):
    from alignx.config import TrainCfg

    return TrainCfg(**kw)


def test_a_lone_trainer_gets_the_idle_cpus_in_whole_cpus():
    tc = _tc(scaling={"num_workers": 1, "cpus_per_worker": 0.6})
    assert wave_cpus_per_worker(tc, 3, free_cpus=2.0, node_cpus=2.0) == 0.6  # the experts' wave
    assert wave_cpus_per_worker(tc, 1, free_cpus=2.0, node_cpus=2.0) == 2.0  # multitask alone
    assert wave_cpus_per_worker(tc, 1, free_cpus=7.5, node_cpus=16.0) == 7.0
    assert wave_cpus_per_worker(tc, 2, free_cpus=8.0, node_cpus=16.0) == 4.0


def test_idle_cpu_share_stays_within_one_node_and_the_free_cpus():
    tc = _tc(scaling={"num_workers": 1, "cpus_per_worker": 0.5})
    assert wave_cpus_per_worker(tc, 1, free_cpus=2.0, node_cpus=1.0) == 1.0  # two 1-CPU nodes
    assert wave_cpus_per_worker(tc, 1, free_cpus=0.8, node_cpus=2.0) == 0.5  # still held
    tc2 = _tc(scaling={"num_workers": 2, "cpus_per_worker": 0.5})
    assert wave_cpus_per_worker(tc2, 1, free_cpus=4.0, node_cpus=4.0) == 2.0


def test_pinned_threads_and_gpu_workers_keep_the_configured_cpus():
    pinned = _tc(scaling={"cpus_per_worker": 0.6}, threads_per_worker=1)
    assert wave_cpus_per_worker(pinned, 1, free_cpus=2.0, node_cpus=2.0) == 0.6
    gpu = _tc(scaling={"use_gpu": True, "cpus_per_worker": 2.0})
    assert wave_cpus_per_worker(gpu, 1, free_cpus=64.0, node_cpus=64.0) == 2.0
