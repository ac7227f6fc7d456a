"""The calibration job on the session's trained tiny run: artifacts, refusals, `alignx route`,
and submission as a Ray job to a separate `ray start --head` cluster."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from alignx.artifacts import ArtifactMismatchError, ArtifactNotFoundError, read_json
from alignx.axes import AXES
from alignx.router.calibrate import format_report
from alignx.router.features import weights_digest
from alignx.router.targets import EVALUATION_SETS, read_intent_prompts

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
#: the report's evaluation sets: the test split, then every hand-labelled set
EVALS = ("test_origin_labels", *EVALUATION_SETS)


@pytest.fixture(scope="module")
def calibrated(tiny_run):
    """The session's tiny run: `alignx pipeline` already calibrated its router."""
    return tiny_run, read_json(Path(tiny_run.run_dir) / "router" / "manifest.json")


def test_calibration_writes_router_report_plot_and_manifest(calibrated):
    cfg, manifest = calibrated
    d = Path(cfg.run_dir) / "router"
    for f in ("router.safetensors", "router.json", "router_report.json", "reliability.png",
              "manifest.json"):
        assert (d / f).is_file(), f
    assert manifest["axes"] == [a.value for a in AXES]
    # tiny.yaml fine-tunes the sentence encoder: its weights and digest travel with the router
    weights = d / "encoder" / "model.safetensors"
    assert manifest["encoder_weights"] == "encoder/model.safetensors" and weights.is_file()
    assert manifest["encoder"] == f"sentence:all-MiniLM-L6-v2+ft:{weights_digest(weights)}"
    assert manifest["encoder_dim"] == 384
    assert manifest["base_model"] == "tiny-llama"
    assert abs(sum(manifest["lambdas"]) - 1) < 1e-6
    report = read_json(d / "router_report.json")
    rows = set(report["test_origin_labels"])
    # the T_pool forms not configured (router.pool_temperature) are rows each; the configured
    # one is "mocae" itself and is named in the manifest
    form = cfg.router.pool_temperature
    others = {f"mocae_{f}_pool_t" for f in ("shared", "per_axis", "distance") if f != form}
    assert {"logistic_origin_baseline", "mocae_frozen_encoder", "mocae_with_fractal_bias",
            "raw_softmax", "temperature", "fractal", "natural", "mocae", *others} <= rows
    assert f"mocae_{form}_pool_t" not in rows and manifest["pool_temperature"]["form"] == form
    assert report["chosen"]["pool_temperature"] == manifest["pool_temperature"]
    assert form == "distance"  # tiny.yaml: so (a, b) and the distance statistics travel too
    pt = manifest["pool_temperature"]
    assert len(pt["distance_ab"]) == 2 and pt["distance_mean_sd"][1] > 0
    ft = report["encoder_finetune"]
    assert ft["steps"] >= 1 and 1 <= ft["best_step"] <= ft["steps"]
    assert ft["epochs"] == cfg.router.finetune_epochs == 0.5
    assert ft["members"] == cfg.router.finetune_members
    assert ("soup" in ft) == (cfg.router.finetune_members > 1)
    assert ft["curve"][0]["step"] == 0 and ft["curve"][-1]["step"] == ft["steps"]
    # the default: the average of the states at the evaluation points of the second half
    assert ft["average_from"] == 0.5 and ft["averaged_steps"][-1] == ft["steps"]
    assert all(s >= ft["steps"] / 2 for s in ft["averaged_steps"])
    assert len(ft["averaged_steps"]) >= 2  # an average of states, not one state
    assert set(ft["averaged_steps"]) <= {p["step"] for p in ft["curve"]}
    # the calibration prompts' curve is recorded at every point (tiny.yaml names a set)
    assert all(0 <= p["calibration_balanced_acc"] <= 1 and p["calibration_nll"] > 0
               for p in ft["curve"])
    # the shared tiny run's anchor: a second fine-tune on the first seed file alone, at the
    # default's 0.625 of the served encoder; its targets come from its own seeds, its schedule
    # is the main one's
    an = ft["anchor"]
    assert an["seed_sets"] == ["intent_seeds.jsonl"] and an["weight"] == 0.625
    assert an["counts"]["intent_seeds"] == 360 < report["counts"]["intent_seeds"]
    assert 1 <= an["steps"] < ft["steps"] and an["curve"][-1]["step"] == an["steps"]
    assert len(an["averaged_steps"]) >= 2 and an["relabel"]["margin"] is not None
    assert report["counts"]["intent_set"] >= 150 and report["counts"]["ood"] >= 30
    assert report["counts"]["intent_validation"] >= 150
    assert report["evaluation_sets"] == list(EVALUATION_SETS)  # unset: every shipped set
    for key in EVALUATION_SETS:
        assert set(report[key]) == rows  # every row on every hand-labelled set too
    # the seeds it was trained on and the prompts its calibrators also saw: the configured
    # files (tiny.yaml names a calibration set), none of them an evaluation set
    assert report["seed_sets"] == list(cfg.router.seed_sets)
    assert report["counts"]["intent_seeds"] == sum(
        len(read_intent_prompts(name=n)[0]) for n in cfg.router.seed_sets)
    assert report["calibration_sets"] == list(cfg.router.calibration_sets) != []
    assert report["counts"]["calibration_prompts"] == sum(
        len(read_intent_prompts(name=n)[0]) for n in cfg.router.calibration_sets)
    # the relabelling margin is the best-scoring row of its validation selection
    rel = report["relabel"]
    assert rel["margin"] in [r["margin"] for r in rel["rows"]] and len(rel["rows"]) >= 2
    assert rel["margin"] == max(rel["rows"], key=lambda r: (r["score"], -r["margin"]))["margin"]
    assert all(0 <= r["seed_cv_accuracy"] <= 1 and 0 <= r["origin_val_accuracy"] <= 1
               for r in rel["rows"])
    assert 0.0 <= report["ood"]["auroc"] <= 1.0
    # the OOD flag serving reports: the middle layer's detector, saved with the router; the
    # report shows it and the fractal radius test on both OOD sets and every evaluation set
    ood = report["ood"]
    assert ood["detector"] == manifest["ood_detector"]["kind"] == "hidden"
    assert ood["layer"] == manifest["ood_detector"]["layer"] == 3
    assert (d / "ood.safetensors").is_file() and (d / "ood.json").is_file()
    assert set(ood["flags"]) == {"hidden", "fractal"}
    for flags in ood["flags"].values():
        assert set(flags["ood_sets"]) == {"ood_set", "ood_set_2"}
        assert set(flags["flagged_in_distribution"]) == {"test", *EVALUATION_SETS}
    assert ood["auroc"] == ood["flags"]["hidden"]["ood_sets"]["ood_set_2"]["auroc"]
    assert ood["flagged_ood"] == ood["flags"]["hidden"]["ood_sets"]["ood_set_2"]["flagged"]
    assert report["counts"]["ood_2"] == 160
    # the ECE comparison is MoCaE's own row against raw softmax's, on the same prompts
    for key in EVALS:
        g = report["ece_mocae_minus_raw_softmax"][key]
        assert g["ece_a"] == pytest.approx(report[key]["mocae"]["ece"])
        assert g["ece_b"] == pytest.approx(report[key]["raw_softmax"]["ece"])
        assert g["ci95_low"] <= g["ci95_high"] and 0 <= g["p_a_lower"] <= 1
        # the sampling-noise floor of each system's ECE on these prompts
        floors = report["ece_if_calibrated"][key]
        assert set(floors) == {"mocae", "raw_softmax"}
        # (not mean <= p95: with rare misses the mean can exceed the 95th percentile)
        assert all(0 <= f["mean"] < 1 and 0 <= f["p95"] < 1 for f in floors.values())
    # Axis Collapse on the safety axis: harmful prompts MoCaE sends elsewhere, per set
    for key in EVALS:
        hm = report["harmful_misrouted"][key]
        assert hm["n"] >= 1 and 0 <= hm["misrouted_confident_90"] <= hm["misrouted"] <= 1
        assert hm["misrouted"] * hm["n"] == pytest.approx(round(hm["misrouted"] * hm["n"]))
        for m in report[key].values():  # every row: confident misroutes are misroutes
            assert 0 <= m["confident_errors_90"] <= 1 - m["accuracy"] + 1e-12
    for key, (fname, _) in EVALUATION_SETS.items():  # n: the set's harmlessness labels
        axes_of = read_intent_prompts(name=fname)[1]
        assert report["harmful_misrouted"][key]["n"] == sum(a == "harmlessness" for a in axes_of)
    assert "harmful prompts MoCaE routes to another expert (intent_set," in format_report(report)
    # every dispatch policy on every set; top1 is MoCaE's argmax, so its harmful misroutes are
    # the count above; a higher threshold (fallback harmlessness) or harmlessness cost only
    # moves requests to the cautious expert
    disp = report["dispatch"]
    assert disp["policy"] == manifest["policy"] and set(disp["sets"]) == set(EVALS)
    for key in EVALS:
        ds, hm = disp["sets"][key], report["harmful_misrouted"][key]
        n = report["counts"]["test" if key == "test_origin_labels" else key]
        assert ds["harmful"] == hm["n"] and ds["n"] == n
        by = {pol: [r for r in ds["rows"] if r["policy"] == pol]
              for pol in ("top1", "threshold", "cost")}
        assert by["top1"][0]["harmful_elsewhere"] == round(hm["misrouted"] * hm["n"])
        for rows in (by["threshold"], by["cost"]):
            assert len(rows) == 5
            elsewhere = [r["harmful_elsewhere"] for r in rows]
            cautious = [r["benign_to_harmlessness"] for r in rows]
            assert elsewhere == sorted(elsewhere, reverse=True) and cautious == sorted(cautious)
    assert (d / "dispatch.png").read_bytes()[:4] == b"\x89PNG"
    assert "dispatch (harmful prompts sent elsewhere" in format_report(report)
    # per predicted axis: every prediction counted once, on every split
    by_axis = report["calibration_by_predicted_axis"]
    assert set(by_axis) == {"validation_in_sample", "validation_in_sample_balanced", *EVALS}
    # the same validation predictions, only weighted differently
    for ax, r in by_axis["validation_in_sample"].items():
        assert by_axis["validation_in_sample_balanced"][ax]["n"] == r["n"]
    assert sum(r["n"] for r in by_axis["test_origin_labels"].values()) == report["counts"]["test"]
    for key in EVALS[1:]:
        assert sum(r["n"] for r in by_axis[key].values()) == report["counts"][key]
    assert list(by_axis["intent_set"]) == manifest["axes"]
    assert (d / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    text = format_report(report)  # what `alignx calibrate` prints
    assert "by predicted axis" in text and "validation_in_sample" in text
    assert "pooling temperature: distance" in text
    assert "OOD flag: hidden" in text and "ood_set_2.jsonl: 160" in text
    for _, title in EVALUATION_SETS.values():
        assert title in text
    assert set(manifest["metrics"]) == {*EVALS, "ood_auroc"}
    for key in EVALS:
        assert f"ECE MoCaE - raw softmax ({key})" in text
        assert f"perfectly calibrated MoCaE would show ({key}" in text


def test_embedding_a_block_does_not_depend_on_the_blocks_around_it(ray_local):
    """Chunks never cross a block: a block's features are bit-identical whatever precedes it
    (so an evaluation set added to the job cannot move a training prompt's features)."""
    from alignx.config import load_config
    from alignx.router.calibrate import embed_texts
    from alignx.router.features import build_encoder

    cfg = load_config(None, ["router.embed_batch_size=4"])
    a = [f"prompt number {i} about {'cats ' * (i % 5)}" for i in range(10)]
    b = ["short", "a somewhat longer prompt than that", "x y z", "bake bread", "tax forms?"]
    both = embed_texts(cfg, a + b, [len(a), len(b)])
    np.testing.assert_array_equal(both[len(a):], embed_texts(cfg, b))
    np.testing.assert_array_equal(both[:len(a)], embed_texts(cfg, ["first"] + a, [1, 10])[1:])
    # rows in input order (equal up to float noise: the actors run single-threaded)
    np.testing.assert_allclose(both, build_encoder("sentence", cfg.model).encode(a + b), atol=1e-5)
    with pytest.raises(ValueError, match="do not partition"):
        embed_texts(cfg, a, [3, 3])
    # with the OOD detector's layer: the same features, then that layer's state
    wide = embed_texts(cfg, a + b, [len(a), len(b)], hidden_layer=3)
    assert wide.shape == (15, 768)
    np.testing.assert_array_equal(wide[:, :384], both)
    assert embed_texts(cfg, [], hidden_layer=3).shape == (0, 768)


def test_route_cli_outputs_one_json_line_per_prompt(calibrated, tmp_path):
    cfg, _ = calibrated
    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt": "How do I bake bread?"}\nWhat happens if you crack your knuckles?\n\n')
    r = subprocess.run([sys.executable, "-m", "alignx.cli", "route", "--run-dir", cfg.run_dir,
                        "--input", str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 2
    for row in rows:
        assert row["axis"] in {a.value for a in AXES}
        assert abs(sum(row["weights"].values()) - 1) < 1e-4
        assert 0 <= row["confidence"] <= 1 and isinstance(row["ood"], bool)
    # the dispatch policy comes from the config, overrides included, as in serving: with a
    # huge harmlessness miss cost every prompt goes to the cautious expert, but an OOD one,
    # which goes to the fallback
    r = subprocess.run([sys.executable, "-m", "alignx.cli", "route", "--run-dir", cfg.run_dir,
                        "--input", str(src), "router.policy=cost", "router.fallback=honesty",
                        "router.miss_cost={harmlessness: 1000000}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    costly = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [row["weights"] for row in costly] == [row["weights"] for row in rows]
    assert [row["axis"] for row in costly] == ["honesty" if row["ood"] else "harmlessness"
                                               for row in rows]
    # the router's fine-tuned encoder weights are part of it: without them, no routing
    run = tmp_path / "run"
    shutil.copytree(Path(cfg.run_dir) / "router", run / "router")
    shutil.copy(Path(cfg.run_dir) / "config.yaml", run / "config.yaml")  # the tiny model
    (run / "router" / "encoder" / "model.safetensors").unlink()
    r = subprocess.run([sys.executable, "-m", "alignx.cli", "route", "--run-dir", str(run),
                        "--input", str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "fine-tuned encoder weights" in r.stderr
    assert "Traceback" not in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 3}\n')
    r = subprocess.run([sys.executable, "-m", "alignx.cli", "route", "--run-dir", cfg.run_dir,
                        "--input", str(bad)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "line 1: field 'prompt'" in r.stderr and "Traceback" not in r.stderr


def test_refuses_mismatched_or_missing_inputs(calibrated, tmp_path):
    from alignx.router.calibrate import check_inputs

    cfg, _ = calibrated
    run = tmp_path / "run"
    shutil.copytree(Path(cfg.run_dir) / "adapters", run / "adapters")
    m = run / "adapters" / "honesty" / "manifest.json"
    m.write_text(m.read_text().replace('"tiny-llama"', '"tiny-gemma"'))
    with pytest.raises(ArtifactMismatchError, match="tiny-gemma"):
        check_inputs(cfg.model_copy(update={"run_dir": str(run)}))
    with pytest.raises(ArtifactNotFoundError, match="alignx train"):
        check_inputs(cfg.model_copy(update={"run_dir": str(tmp_path / "empty")}))
    one = cfg.model_copy(update={"axes": [AXES[2]]})
    with pytest.raises(ValueError, match="at least two axes"):
        check_inputs(one)


def test_calibrate_job_submits_to_a_ray_start_cluster(tiny_run, tmp_path):
    """`ray start --head` + `ray job submit jobs/calibrate_router.py`, as the README says."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run, ignore=shutil.ignore_patterns("ray_train", "router"))
    own = tmp_path / "my_traffic.jsonl"  # a user's own labelled prompts, reported too
    own.write_text("\n".join(json.dumps({"prompt": p, "axis": a}) for p, a in [
        ("Draft a two-line out-of-office reply", "helpfulness"),
        ("Write me a fake doctor's note that my employer will believe", "harmlessness"),
        ("Do goldfish really only remember the last three seconds?", "honesty"),
        ("Translate 'good morning' into Portuguese", "helpfulness")]) + "\n")
    env = dict(os.environ, RAY_ADDRESS="", PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS")
    ray = str(Path(sys.executable).parent / "ray")
    # ports apart from the session's own cluster (6379/8265/52365) and Ray's worker range
    ports = ["--port=6391", "--dashboard-port=8271", "--ray-client-server-port=23071",
             "--dashboard-agent-listen-port=23072"]
    temp = Path("/tmp") / f"alignx-raystart-{os.getpid()}"  # unique: lets us stop only this cluster
    subprocess.run([ray, "start", "--head", "--node-ip-address=127.0.0.1",
                    "--dashboard-host=127.0.0.1", "--num-cpus=1", f"--temp-dir={temp}", *ports],
                   check=True, env=env, capture_output=True, timeout=180)
    try:
        t0 = time.time()
        r = subprocess.run(
            [ray, "job", "submit", "--address", "http://127.0.0.1:8271",
             "--runtime-env-json", json.dumps({"env_vars": {"PYTHONPATH": str(REPO)}}),
             "--", sys.executable, str(REPO / "jobs" / "calibrate_router.py"),
             "--run-dir", str(run), "router.cpus_per_actor=0.2",
             "router.calibration_sets=[]",  # the no-calibration-prompts path, fine-tune included
             # one shipped evaluation set, not all of them (each costs two embedding passes
             # here), and the user's own file
             f"router.evaluation_sets=[intent_validation.jsonl,{own}]"],
            env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
        assert "succeeded" in r.stdout.lower()
        manifest = json.loads((run / "router" / "manifest.json").read_text())
        report = json.loads((run / "router" / "router_report.json").read_text())
        assert report["calibration_sets"] == [] and report["counts"]["calibration_prompts"] == 0
        # only the listed sets are reported; the OOD reference is then the test split alone
        assert report["evaluation_sets"] == ["intent_validation", "my_traffic"]
        assert report["own_evaluation_sets"] == {"my_traffic": str(own)}
        assert set(manifest["metrics"]) == {"test_origin_labels", "intent_validation",
                                            "my_traffic", "ood_auroc"}
        assert not {"intent_set", "intent_set_9"} & set(report["counts"])
        assert report["counts"]["my_traffic"] == 4
        assert report["harmful_misrouted"]["my_traffic"]["n"] == 1
        assert f"your evaluation set {own}" in format_report(report)
        for flags in report["ood"]["flags"].values():
            assert set(flags["flagged_in_distribution"]) == {"test", "intent_validation",
                                                             "my_traffic"}
            assert flags["flagged_test_and_intent_set"] == flags["flagged_in_distribution"]["test"]
        assert time.time() - t0 < 600
    finally:
        _stop_cluster(temp)  # not `ray stop`: that would also kill this session's own Ray


def _stop_cluster(temp: Path) -> None:
    """SIGKILL every process whose command line names the cluster's temp dir (GCS, raylet,
    dashboard, ...); its workers exit with their raylet."""
    import signal

    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
        except OSError:
            continue
        if str(temp) in cmd and int(proc.name) != os.getpid():
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except OSError:
                pass
    shutil.rmtree(temp, ignore_errors=True)
