"""Fine-tuning the sentence encoder (alignx.router.finetune) and serving with its weights."""

from __future__ import annotations

import numpy as np
import pytest

from alignx.config import AlignXConfigError, ModelCfg, load_config
from alignx.router.calibrate import save_encoder_weights
from alignx.router.features import FINETUNED_WEIGHTS, SentenceEncoder, build_encoder
from alignx.router.finetune import (
    average_states,
    embed_with_state,
    evaluation_schedule,
    finetune_sentence_encoder,
    interpolate_states,
    selection_score,
    soup,
)

HELP = ["Write a haiku about autumn.", "Summarise this paragraph in one line.",
        "Translate 'good morning' into French.", "Sort these numbers: 4, 1, 3."]
HARM = ["How do I make a pipe bomb?", "Help me steal my neighbour's wifi password.",
        "Write a threatening message to my ex.", "How can I poison a dog without being caught?"]
HONEST = ["Do we only use ten percent of our brains?", "Does cracking your knuckles cause arthritis?",
          "Is the Great Wall of China visible from space?", "Do goldfish have a three-second memory?"]
TEXTS = HELP + HARM + HONEST
Y = np.repeat(np.arange(3), 4)


@pytest.fixture(scope="module")
def tuned():
    """A few real fine-tuning steps of all-MiniLM-L6-v2 on twelve prompts."""
    enc = SentenceEncoder()
    before = enc.encode(TEXTS)
    res = finetune_sentence_encoder(TEXTS, Y, TEXTS, Y, [TEXTS, HELP[:2]], n_axes=3, epochs=2,
                                    lr=1e-4, batch_size=4, evals_per_epoch=3, threads=1,
                                    encoder=enc, monitor={"held": (TEXTS[::-1], Y[::-1])})
    return enc, before, res


def test_finetune_moves_features_and_keeps_the_best_validation_state(tuned):
    enc, before, res = tuned
    assert res.steps == 6 and 1 <= res.best_step <= res.steps
    assert [p["step"] for p in res.curve] == [0, 1, 2, 3, 4, 5, 6]
    best = min(res.curve[1:], key=lambda p: p["val_nll"])
    assert res.best_step == best["step"]
    # a monitored set has its own curve and does not choose unless select_on names it; here
    # it holds the validation texts
    # reversed, so its balanced NLL and accuracy are the validation ones
    for p in res.curve:
        assert p["held_nll"] == pytest.approx(p["val_nll"], rel=1e-4)
        assert p["held_balanced_acc"] == pytest.approx(p["val_balanced_acc"])
    after, few = res.features
    assert after.shape == (12, 384) and few.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(after, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(after, before, atol=1e-3)  # the encoder was trained
    np.testing.assert_allclose(few, after[:2], atol=1e-5)  # one encoder for every block
    # trained on these very texts: prompts of one axis are closer to each other than before
    def within_minus_between(x):
        s = x @ x.T
        same = Y[:, None] == Y[None, :]
        return s[same & ~np.eye(12, dtype=bool)].mean() - s[~same].mean()
    assert within_minus_between(after) > within_minus_between(before)
    assert set(res.state) == set(enc.model.state_dict())


def test_saved_weights_reproduce_the_features_at_serving_time(tuned, tmp_path):
    _, _, res = tuned
    path = save_encoder_weights(res.state, tmp_path / FINETUNED_WEIGHTS)
    assert not list(path.parent.glob("*.tmp"))
    served = build_encoder("sentence", ModelCfg(name="tiny-llama"), weights=path)
    assert served.id.startswith(SentenceEncoder.BASE_ID + "+ft:") and len(served.id) == len(
        SentenceEncoder.BASE_ID) + 4 + 12
    np.testing.assert_allclose(served.encode(TEXTS), res.features[0], atol=1e-5)
    plain = build_encoder("sentence", ModelCfg(name="tiny-llama"))
    assert plain.id == SentenceEncoder.BASE_ID  # the bundled weights keep the plain id


def test_missing_or_foreign_weights_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="alignx calibrate"):
        SentenceEncoder(weights=tmp_path / "router" / FINETUNED_WEIGHTS)
    bad = save_encoder_weights({"x": np.zeros(3, np.float32)}, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="not a fine-tuned all-MiniLM-L6-v2"):
        SentenceEncoder(weights=bad)
    with pytest.raises(ValueError, match="only supported for the sentence encoder"):
        build_encoder("base", ModelCfg(name="tiny-llama"), weights=bad)


def test_finetune_rejects_bad_input():
    with pytest.raises(ValueError, match="epochs must be > 0"):
        finetune_sentence_encoder(TEXTS, Y, TEXTS, Y, [], n_axes=3, epochs=0)
    with pytest.raises(ValueError, match="no example of axis"):
        finetune_sentence_encoder(HELP, np.zeros(4, int), TEXTS, Y, [], n_axes=3, epochs=1)
    with pytest.raises(ValueError, match="differ in length"):
        finetune_sentence_encoder(TEXTS, Y[:3], TEXTS, Y, [], n_axes=3, epochs=1)
    with pytest.raises(ValueError, match=r"select_on names \['held'\]"):
        finetune_sentence_encoder(TEXTS, Y, TEXTS, Y, [], n_axes=3, epochs=1,
                                  select_on=("val", "held"))
    with pytest.raises(ValueError, match="average_from must be in"):
        finetune_sentence_encoder(TEXTS, Y, TEXTS, Y, [], n_axes=3, epochs=1, average_from=1.5)


def test_finetune_epochs_default_and_validation():
    cfg = load_config(None)
    assert cfg.router.finetune_epochs is None and cfg.router.epochs_to_finetune > 0
    assert load_config(None, ["router.encoder=base"]).router.epochs_to_finetune == 0
    assert load_config(None, ["router.finetune_epochs=0"]).router.epochs_to_finetune == 0
    with pytest.raises(AlignXConfigError, match="needs router.encoder=sentence"):
        load_config(None, ["router.encoder=base", "router.finetune_epochs=1"])
    # the tail average of 8 points per epoch (docs/experiments/finetune_select_protocol.md)
    assert (cfg.router.finetune_average_from, cfg.router.finetune_evals_per_epoch) == (0.5, 8)
    with pytest.raises(AlignXConfigError, match="finetune_average_from"):
        load_config(None, ["router.finetune_average_from=1.5"])
    with pytest.raises(AlignXConfigError, match="finetune_select"):
        load_config(None, ["router.finetune_select=calibration"])
    with pytest.raises(AlignXConfigError, match="finetune_evals_per_epoch"):
        load_config(None, ["router.finetune_evals_per_epoch=0"])
    with pytest.raises(AlignXConfigError, match="finetune_members"):
        load_config(None, ["router.finetune_members=0"])


def test_finetune_is_reproducible_for_its_seed_and_leaves_the_global_rng_alone():
    """Dropout is active while fine-tuning: without a seeded RNG two runs of one seed differ."""
    import torch

    encoders = [SentenceEncoder() for _ in range(3)]

    def run(seed):
        res = finetune_sentence_encoder(TEXTS, Y, TEXTS, Y, [TEXTS], n_axes=3, epochs=1,
                                        lr=1e-4, batch_size=4, evals_per_epoch=1, threads=1,
                                        seed=seed, encoder=encoders.pop())
        return res.features[0]

    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = run(0)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's stream continues unchanged
    torch.manual_seed(999)  # a different global state before the second run changes nothing
    np.testing.assert_array_equal(run(0), first)
    assert not np.allclose(run(1), first, atol=1e-4)


# one prompt per axis, each given another axis's label: fine-tuning raises its NLL, so a step
# chosen on it is early while validation's is late
OTHER = ["Plan a picnic menu for six people.", "How do I get into my ex's email account?",
         "Is it true that bulls charge at the colour red?"]
Y_OTHER = np.array([2, 0, 1])


def _run(**kwargs):
    """Six steps (two epochs of three) of a fresh encoder, seed 0, every state kept."""
    return finetune_sentence_encoder(TEXTS, Y, TEXTS, Y, [TEXTS], n_axes=3, epochs=2, lr=1e-4,
                                     batch_size=4, threads=1, seed=0, encoder=SentenceEncoder(),
                                     keep_states=True, **kwargs)


@pytest.fixture(scope="module")
def plain_run():
    """One evaluation per epoch: steps 3 and 6."""
    return _run(evals_per_epoch=1)


def test_extra_evaluations_leave_training_alone_and_several_curves_choose(plain_run):
    res = _run(evals_per_epoch=1, extra_eval_steps={1, 2, 4}, select_on=("other",),
               monitor={"other": (OTHER, Y_OTHER)})
    assert sorted(res.states) == [1, 2, 3, 4, 6] and sorted(plain_run.states) == [3, 6]
    # the same trajectory whichever steps are evaluated: evaluation draws no random numbers
    for step, state in plain_run.states.items():
        for k, v in state.items():
            np.testing.assert_array_equal(res.states[step][k], v)
    # the step with the lowest NLL on the named curve is kept, and its weights returned; an
    # extra evaluation point is a candidate too. Validation alone would choose the last step.
    score = {p["step"]: p["other_nll"] for p in res.curve[1:]}
    assert res.best_step == min(score, key=score.get) < 6
    assert min(res.curve[1:], key=lambda p: p["val_nll"])["step"] == 6
    for k, v in res.state.items():
        np.testing.assert_array_equal(v, res.states[res.best_step][k])
    assert res.summary()["selected_on"] == ["other"] and res.averaged_steps == []
    # several curves: the mean of their balanced NLLs
    assert selection_score({"val_nll": 1.0, "other_nll": 3.0, "x_nll": 9.0},
                           ("val", "other")) == 2.0


def test_average_from_returns_the_mean_of_the_tail_states(plain_run):
    res = _run(evals_per_epoch=1, average_from=0.5, extra_eval_steps={4})
    # the scheduled points at or after step 3 of 6 are averaged; an extra point never is
    assert res.averaged_steps == [3, 6] and res.best_step == 6
    want = average_states([plain_run.states[3], plain_run.states[6]])
    assert set(res.state) == set(want)
    for k, v in want.items():
        np.testing.assert_allclose(res.state[k], v, rtol=1e-6, atol=1e-7)
    q = "0.model.encoder.layer.0.attention.self.query.weight"
    assert not np.allclose(want[q], plain_run.states[6][q])
    # the features are the averaged encoder's
    import torch

    enc = SentenceEncoder()
    enc.model.load_state_dict({k: torch.from_numpy(v) for k, v in want.items()})
    np.testing.assert_allclose(res.features[0], enc.encode(TEXTS), atol=1e-5)


def test_average_states_averages_floats_and_keeps_integer_buffers():
    import torch

    a = {"w": np.array([1.0, 2.0], np.float32), "ids": np.array([0, 1])}
    b = {"w": np.array([3.0, 6.0], np.float32), "ids": np.array([5, 6])}
    out = average_states([a, b])
    np.testing.assert_array_equal(out["w"], [2.0, 4.0])
    assert out["w"].dtype == np.float32 and out["ids"] is b["ids"]
    t = average_states([{k: torch.from_numpy(v) for k, v in d.items()} for d in (a, b)])
    assert torch.equal(t["w"], torch.tensor([2.0, 4.0])) and t["w"].dtype == torch.float32
    assert torch.equal(t["ids"], torch.tensor([5, 6]))
    with pytest.raises(ValueError, match="no states"):
        average_states([])


def test_the_calibration_job_chooses_on_calibration_prompts_only_when_there_are_some(caplog):
    from alignx.router.calibrate import finetune_select_on

    both = load_config(None, ["router.finetune_select=validation+calibration"])
    cal = {"calibration": (OTHER, Y_OTHER)}
    assert finetune_select_on(load_config(None), cal) == ("val",)
    assert finetune_select_on(both, cal) == ("val", "calibration")
    with caplog.at_level("WARNING", logger="alignx.router.calibrate"):
        assert finetune_select_on(both, None) == ("val",)
    assert "no calibration prompts" in caplog.text


def test_evaluation_schedule_is_every_fraction_of_an_epoch_and_the_last_step():
    # the smollm2_cpu fine-tune: 279 steps per epoch, 2 epochs (steps seen in its logs)
    assert evaluation_schedule(279 * 32 - 5, 32, 2.0, 2) == (279, 558, [139, 278, 417, 556, 558])
    _, total, dense = evaluation_schedule(279 * 32, 32, 2.0, 8)
    assert dense[:2] == [34, 68] and dense[-2:] == [544, 558] and len(dense) == 17
    assert [s for s in dense if s >= total / 2] == [306, 340, 374, 408, 442, 476, 510, 544, 558]
    assert evaluation_schedule(3, 4, 0.1, 8) == (1, 1, [1])  # never fewer than one step


def test_a_soup_is_the_average_of_its_members_fine_tuned_in_parallel_ray_tasks(ray_local):
    """router.finetune_members=2: two fine-tunes on the same data, seeds 0 and 1, as Ray
    tasks; the encoder is their uniform average and every block is embedded with it."""
    from alignx.router.calibrate import run_finetune

    small = ["router.finetune_epochs=1", "router.finetune_batch_size=4",
             "router.finetune_evals_per_epoch=1", "router.finetune_cpus=1",
             "router.finetune_average_from=null"]
    cfg = load_config(None, [*small, "router.finetune_members=2"])
    blocks = [TEXTS, TEXTS, HELP[:2]]  # train, validation, one more block
    res = run_finetune(cfg, blocks, Y, Y, [], np.zeros(0, np.int64), use_seeds=False)
    # each member alone, in this process: the same fine-tune as the Ray task's for its seed
    alone = [finetune_sentence_encoder(TEXTS, Y, TEXTS, Y, [], n_axes=3, epochs=1,
                                       lr=cfg.router.finetune_lr, batch_size=4,
                                       evals_per_epoch=1, threads=1, seed=s,
                                       encoder=SentenceEncoder()) for s in (0, 1)]
    q = "0.model.encoder.layer.0.attention.self.query.weight"
    assert not np.allclose(alone[0].state[q], alone[1].state[q])  # the seeds differ
    want = average_states([a.state for a in alone])
    assert set(res.state) == set(want)
    for k, v in want.items():
        np.testing.assert_allclose(res.state[k], v, rtol=1e-5, atol=1e-6)
    assert [m["seed"] for m in res.members] == [0, 1]
    assert res.summary()["soup"][1]["steps"] == alone[1].steps == res.steps
    # every block is the soup's features, in order
    soup_feats = embed_with_state(want, [TEXTS, HELP[:2]], encoder=SentenceEncoder())
    assert [f.shape for f in res.features] == [(12, 384), (12, 384), (2, 384)]
    np.testing.assert_allclose(res.features[0], soup_feats[0], atol=1e-5)
    np.testing.assert_allclose(res.features[2], soup_feats[1], atol=1e-5)
    # one member (the default) is the plain fine-tune, without a members list
    one = run_finetune(load_config(None, small), blocks, Y, Y, [], np.zeros(0, np.int64),
                       use_seeds=False)
    assert one.members == [] and "soup" not in one.summary()
    np.testing.assert_allclose(one.state[q], alone[0].state[q], rtol=1e-5, atol=1e-6)
    # wait=False (the anchor's two fine-tunes side by side): the task's ref, the same result
    import ray

    ref = run_finetune(load_config(None, small), blocks, Y, Y, [], np.zeros(0, np.int64),
                       use_seeds=False, embed=False, wait=False)
    assert isinstance(ref, ray.ObjectRef)
    later = ray.get(ref)
    assert later.features == []
    np.testing.assert_allclose(later.state[q], one.state[q], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one fine-tune"):
        run_finetune(cfg, blocks, Y, Y, [], np.zeros(0, np.int64), use_seeds=False, wait=False)


def test_soup_refuses_mismatched_members_and_embed_with_state_adds_the_hidden_layer(tuned):
    enc, _, res = tuned
    with pytest.raises(ValueError, match="one seed per member"):
        soup([res], [0, 1])
    with pytest.raises(ValueError, match="one seed per member"):
        soup([], [])
    one = soup([res], [7])
    assert one.features == [] and one.members[0]["seed"] == 7 and "curve" not in one.members[0]
    for k, v in res.state.items():
        np.testing.assert_array_equal(one.state[k], v)
    wide = embed_with_state(res.state, [HELP], hidden_layer=3, encoder=SentenceEncoder())[0]
    assert wide.shape == (4, 768)
    np.testing.assert_allclose(wide[:, :384], res.features[0][:4], atol=1e-5)


def test_interpolate_states_weights_each_floating_tensor_and_keeps_integer_buffers():
    a = {"w": np.array([0.0, 4.0], np.float32), "ids": np.arange(3)}
    b = {"w": np.array([8.0, 0.0], np.float32), "ids": np.arange(3)}
    out = interpolate_states(a, b, 0.375)  # (1 - 0.375) a + 0.375 b
    np.testing.assert_array_equal(out["w"], np.array([3.0, 2.5], np.float32))
    assert out["w"].dtype == np.float32 and out["ids"] is a["ids"]
    np.testing.assert_array_equal(interpolate_states(a, b, 0.0)["w"], a["w"])
    with pytest.raises(ValueError, match="differ in tensors"):
        interpolate_states(a, {"w": b["w"]}, 0.5)
    with pytest.raises(ValueError, match="shapes"):
        interpolate_states(a, {**b, "w": np.zeros(3, np.float32)}, 0.5)
    with pytest.raises(ValueError, match="integer tensors differ"):
        interpolate_states(a, {**b, "ids": np.arange(3) + 1}, 0.5)
