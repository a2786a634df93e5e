"""The classifier two-sample test: chance on one distribution, near 1 on clearly different ones,
seeded, and one-sentence errors for inputs it cannot use. Small images, so each test takes seconds."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from spatialvae.lab.c2st import MIN_PER_SIDE, binomial_p_value, classifier_two_sample_test, roc_auc

torch.set_num_threads(1)


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """(n, 1, size, size) in [0, 1]: bicubic upsampling of 6x6 uniform noise (smooth random blobs)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 1, 6, 6, generator=g)
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def test_two_draws_of_one_distribution_are_at_chance():
    res = classifier_two_sample_test(smooth_images(100, seed=1), smooth_images(100, seed=2), seed=0)
    assert res["n_heldout"] == 100 and res["n_train"] == 100
    assert abs(res["accuracy"] - 0.5) <= 0.15, res  # 3 standard errors of chance at 100 held-out images
    assert res["p_value"] > 0.001
    assert abs(res["auc"] - 0.5) <= 0.2, res  # ~3.5 standard errors of the AUC at 50 + 50
    assert math.isfinite(res["log_loss"]) and res["log_loss"] > 0


def test_noisy_images_are_told_from_clean_ones():
    clean = smooth_images(100, seed=2)
    noisy = (smooth_images(100, seed=1) + 0.2 * torch.randn(100, 1, 32, 32, generator=torch.Generator().manual_seed(3)))
    res = classifier_two_sample_test(noisy.clamp(0, 1), clean, seed=0)
    assert res["accuracy"] >= 0.9, res
    assert res["p_value"] < 1e-6 and res["std_error"] < 0.05
    assert res["auc"] >= 0.9 and res["log_loss"] < math.log(2), res


def test_same_seed_same_result_and_the_larger_set_is_cut():
    fake, real = smooth_images(30, seed=1), smooth_images(50, seed=2) * 0.9
    a = classifier_two_sample_test(fake, real, seed=7, epochs=3)
    b = classifier_two_sample_test(fake, real, seed=7, epochs=3)
    assert a["accuracy"] == b["accuracy"] and a["final_train_loss"] == b["final_train_loss"]
    assert a["auc"] == b["auc"] and a["log_loss"] == b["log_loss"]
    assert (a["n_fake"], a["n_real"], a["n_per_side"], a["n_train"], a["n_heldout"]) == (30, 50, 30, 30, 30)


def test_larger_images_are_area_downsampled():
    res = classifier_two_sample_test(smooth_images(16, size=48, seed=1), smooth_images(16, size=48, seed=2),
                                     image_size=24, epochs=1)
    assert res["image_size"] == [24, 24]
    res = classifier_two_sample_test(smooth_images(16, size=24, seed=1), smooth_images(16, size=24, seed=2),
                                     image_size=None, epochs=1)
    assert res["image_size"] == [24, 24]


def test_binomial_p_value():
    assert binomial_p_value(0, 10) == 1.0
    assert binomial_p_value(10, 10) == 2 ** -10
    assert binomial_p_value(5, 10) == pytest.approx(638 / 1024)
    assert math.isfinite(binomial_p_value(700, 1200)) and binomial_p_value(700, 1200) < 1e-8


def test_roc_auc_closed_form():
    y = torch.tensor([1, 1, 0, 0, 0])
    assert roc_auc(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]), y) == 1.0  # every positive above every negative
    assert roc_auc(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), y) == 0.0  # every one below
    assert roc_auc(torch.zeros(5), y) == 0.5  # all tied: each pair counts one half
    # Positives 0.8, 0.4 against negatives 0.5, 0.4, 0.1: 0.8 beats all 3, 0.4 beats 0.1 and ties 0.4
    # -> (3 + 1.5) / (2 * 3) pairs.
    assert roc_auc(torch.tensor([0.8, 0.4, 0.5, 0.4, 0.1]), y) == 0.75


def test_roc_auc_is_the_pairwise_count_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (40,), generator=g).float()  # many ties
    y = torch.randint(0, 2, (40,), generator=g)
    pos, neg = scores[y == 1], scores[y == 0]
    pairs = (pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()
    assert roc_auc(scores, y) == pytest.approx(float(pairs.mean()), abs=1e-12)
    with pytest.raises(ValueError, match="both classes"):
        roc_auc(scores, torch.ones(40))


@pytest.mark.parametrize("fake, real, match", [
    (smooth_images(16, size=32), smooth_images(16, size=16), r"fake images are \(1, 32, 32\) .* real ones \(1, 16, 16\)"),
    (smooth_images(MIN_PER_SIDE - 1), smooth_images(40), rf"got {MIN_PER_SIDE - 1} fake and 40 real images.* at least "
                                                         rf"{MIN_PER_SIDE} of each"),
    ((smooth_images(16) * 255).byte(), smooth_images(16), r"fake images must be a float tensor .* torch.uint8"),
    (smooth_images(16), smooth_images(16)[:, 0], r"real images must be a float tensor \(N, C, H, W\)"),
])
def test_bad_input_is_one_clear_sentence(fake, real, match):
    with pytest.raises(ValueError, match=match) as err:
        classifier_two_sample_test(fake, real)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("full_batches_only,steps", [(False, 3), (True, 2)])  # 10 images in batches of 4
def test_the_shared_classifier_trainer_draws_its_batches_and_learns(full_batches_only, steps):
    from spatialvae.lab.classifier import ClassifierSchedule, fit_classifier

    net = torch.nn.Linear(2, 1)
    x, y = torch.randn(10, 2, generator=torch.Generator().manual_seed(0)), torch.ones(10, 1)
    seen, calls = [], []
    s = ClassifierSchedule(epochs=2, batch_size=4, lr=0.1, full_batches_only=full_batches_only)

    def loss_fn(out, t):
        seen.append(len(out))
        return torch.nn.functional.binary_cross_entropy_with_logits(out, t)

    losses = fit_classifier(net, x, y, loss_fn, s, torch.Generator().manual_seed(0),
                            on_epoch=lambda e, loss: calls.append((e, loss)))
    assert len(seen) == 2 * steps and sum(seen) == (20 if not full_batches_only else 16)
    assert [e for e, _ in calls] == [0, 1] and [loss for _, loss in calls] == losses
    assert losses[1] < losses[0]  # all targets 1: one direction to learn
