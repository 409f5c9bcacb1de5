"""Training that can be trusted: fixed seed -> identical weights on the CPU; --resume == uninterrupted.

The config switches on every source of randomness the loop has (dropout, Gaussian posterior
sampling, instance noise on D's inputs, noise on the decoder's codes, shuffling, prior draws for
several discriminator steps), a cosine learning-rate schedule, D's gradient penalty and moving
averages of the weights, so that a state the checkpoint forgot to carry would show up as a difference.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from aae_runtime.contract.priors import make_prior_spec, sample_prior
from aae_train.checkpoint import load_checkpoint
from aae_train.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from aae_train.models import build_models
from aae_train.families.adversary import generator_loss, mmd2, r1_penalty
from aae_train.train import lr_factor, train


def _cfg(mnist_dir, epochs: int, seed: int = 3) -> RunConfig:
    return RunConfig(
        model=ModelConfig(latent_dim=3, hidden=24, dropout=0.2, disc_dropout=0.1, posterior="gaussian",
                          prior=make_prior_spec("mog", 3, components=4, radius=2.0)),
        data=DataConfig(source="mnist", path=str(mnist_dir), limit=240, val_fraction=0.25),
        train=TrainConfig(epochs=epochs, batch_size=40, seed=seed, device="cpu", lr_schedule="cosine",
                          label_smoothing=0.1, disc_noise=0.05, gradient_penalty=1.0, disc_steps=2, code_noise=0.3, ema=0.9),
    )


def _weights(path) -> dict[str, torch.Tensor]:
    """Every weight the checkpoint holds: the model (the moving averages here), D, and the trained nets."""
    state = load_checkpoint(path)
    nets = {net: state[net] for net in ("encoder", "decoder", "discriminator")}
    nets.update({f"trained.{net}": state["trained"][net] for net in ("encoder", "decoder") if "trained" in state})
    return {f"{net}.{k}": v for net, weights in nets.items() for k, v in weights.items()}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, mnist_dir):
    """Two epochs in one go."""
    return train(_cfg(mnist_dir, 2), tmp_path_factory.mktemp("straight"))


def test_same_seed_gives_identical_weights_and_metrics(straight, tmp_path, mnist_dir):
    again = train(_cfg(mnist_dir, 2), tmp_path / "again")
    a, b = _weights(straight.checkpoint), _weights(again.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(straight.metrics) == strip(again.metrics)


def test_another_seed_gives_other_weights(straight, tmp_path, mnist_dir):
    other = train(_cfg(mnist_dir, 1, seed=4), tmp_path / "other")
    first = _weights(straight.checkpoint)
    assert not torch.equal(_weights(other.checkpoint)["encoder.net.0.weight"], first["encoder.net.0.weight"])


def test_resume_reaches_the_weights_of_an_uninterrupted_run(straight, tmp_path, mnist_dir):
    # Stop after 1 epoch, then resume from the checkpoint file alone to 2 in total. (The cosine
    # schedule's first epoch runs at the full rate whatever the total, so the legs agree with it.)
    part = train(_cfg(mnist_dir, 1), tmp_path / "part")
    resumed = train(_cfg(mnist_dir, 2), tmp_path / "part", resume=part.checkpoint)
    a, b = _weights(straight.checkpoint), _weights(resumed.checkpoint)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    rows = [json.loads(line) for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[-1]["recon_loss"] == straight.metrics[-1]["recon_loss"]


def test_metrics_carry_schedule_and_prior_match(straight):
    rows = straight.metrics
    assert [r["lr_factor"] for r in rows] == [round(lr_factor("cosine", e, 2, 0.1), 6) for e in range(2)]
    assert rows[0]["lr_factor"] == 1.0 and rows[-1]["lr_factor"] == pytest.approx(0.1)
    assert all(r["prior_mmd"] >= -0.01 for r in rows) and len(rows[0]["latent_std"]) == 3


def test_disc_steps_update_the_discriminator_that_many_times_per_minibatch(straight):
    state = load_checkpoint(straight.checkpoint)
    steps = lambda name: int(next(iter(state["optimizers"][name]["state"].values()))["step"])  # noqa: E731
    # 180 training images in minibatches of 40: 4 per epoch, 2 epochs; D takes 2 steps each.
    assert (steps("recon"), steps("gen"), steps("disc")) == (8, 8, 16)


def test_code_noise_changes_what_the_decoder_learns(tmp_path, mnist_dir):
    cfg = _cfg(mnist_dir, 1)
    quiet = train(cfg.replace(train=replace(cfg.train, code_noise=0.0)), tmp_path / "quiet")
    noisy = train(cfg, tmp_path / "noisy")
    assert not torch.equal(_weights(quiet.checkpoint)["decoder.net.0.weight"], _weights(noisy.checkpoint)["decoder.net.0.weight"])


def test_r1_penalty_is_the_squared_gradient_norm_of_d():
    linear = torch.nn.Linear(3, 1)
    z = torch.randn(5, 3, requires_grad=True)
    penalty = r1_penalty(linear(z), z)  # D(z) = w.z + b: the gradient is w at every z
    assert torch.allclose(penalty, linear.weight.square().sum())
    penalty.backward()  # differentiable in D's weights: D's update can lower it
    assert torch.allclose(linear.weight.grad, 2 * linear.weight)


@pytest.mark.parametrize("family", ["aae", "semi"])
def test_an_encoder_without_randomness_encodes_once_for_both_regularisation_steps(family, tmp_path, mnist_dir, monkeypatch):
    """D's fakes and the generator's codes from one pass give the weights of two passes, bit for bit."""
    from aae_train.families.base import Family

    cfg = replace(_cfg(mnist_dir, 1), family=family, model=ModelConfig(latent_dim=8, hidden=24))
    cfg = replace(cfg, train=replace(cfg.train, ema=0.0))
    one_pass = _weights(train(cfg, tmp_path / "one").checkpoint)
    monkeypatch.setattr(Family, "encoder_draws_noise", property(lambda self: True))  # the two-pass path
    two_passes = _weights(train(cfg, tmp_path / "two").checkpoint)
    assert one_pass.keys() == two_passes.keys()
    assert all(torch.equal(one_pass[k], two_passes[k]) for k in one_pass)


def test_generator_loss_reaches_the_codes_but_leaves_d_without_gradients():
    torch.manual_seed(0)
    disc = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    disc[0].bias.requires_grad_(False)  # a flag set before is kept
    z = torch.randn(6, 3, requires_grad=True)
    t = TrainConfig(disc_noise=0.0)
    generator_loss(disc, z, t).backward()
    assert all(p.grad is None for p in disc.parameters())
    assert [p.requires_grad for p in disc.parameters()] == [True, False, True, True]
    expected = torch.autograd.grad(torch.nn.functional.binary_cross_entropy_with_logits(disc(z), torch.ones(6, 1)), z)[0]
    assert torch.equal(z.grad, expected)  # the same gradient the codes got with D's weights tracked


def test_gradient_penalty_keeps_the_discriminator_flat_at_prior_samples(tmp_path, mnist_dir):
    cfg = _cfg(mnist_dir, 2)
    cfg = cfg.replace(train=replace(cfg.train, lr_disc=1e-2, disc_noise=0.0))  # a D that learns fast

    def penalty_after_training(gamma: float) -> float:
        run = train(cfg.replace(train=replace(cfg.train, gradient_penalty=gamma)), tmp_path / f"gamma{gamma}")
        state = load_checkpoint(run.checkpoint)
        disc = build_models(cfg.model)[2]
        disc.load_state_dict(state["discriminator"])
        z = torch.from_numpy(sample_prior(cfg.model.prior, 500, np.random.default_rng(0))).requires_grad_(True)
        return r1_penalty(disc.eval()(z), z).item()

    assert penalty_after_training(10.0) < 0.5 * penalty_after_training(0.0)


def test_ema_saves_the_moving_average_as_the_model(straight, tmp_path, mnist_dir):
    state = load_checkpoint(straight.checkpoint)
    assert state["trained"]["ema_updates"] == 8
    averaged, trained = state["decoder"]["net.0.weight"], state["trained"]["decoder"]["net.0.weight"]
    assert not torch.equal(averaged, trained)
    cfg = _cfg(mnist_dir, 2)
    plain = load_checkpoint(train(cfg.replace(train=replace(cfg.train, ema=0.0)), tmp_path / "plain").checkpoint)
    assert "trained" not in plain
    # Same seed, same training: the trained weights agree, only what is saved as the model differs.
    assert torch.equal(plain["decoder"]["net.0.weight"], trained)


def test_lr_schedules():
    assert [lr_factor("constant", e, 4, 0.1) for e in range(4)] == [1.0] * 4
    assert [lr_factor("step", e, 8, 0.1) for e in range(8)] == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])
    cos = [lr_factor("cosine", e, 5, 0.2) for e in range(5)]
    assert cos[0] == 1.0 and cos[-1] == pytest.approx(0.2) and cos == sorted(cos, reverse=True)


def test_mmd_is_near_zero_for_the_prior_itself_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    prior = torch.randn(500, 4, generator=g, dtype=torch.float64)
    same = torch.randn(500, 4, generator=g, dtype=torch.float64)
    assert abs(mmd2(same, prior)) < 0.01
    assert mmd2(same + 0.5, prior) > 0.02 > abs(mmd2(same, prior))
    assert mmd2(same + 2.0, prior) > mmd2(same + 0.5, prior)
