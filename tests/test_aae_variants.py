"""The paper's variants end to end on tiny shapes: every prior, posterior and architecture trains,
exports deterministically with ONNX Runtime parity, and samples from the metadata alone.

Cases (each trained for one epoch on real images, then exported with the public API):
conv + universal posterior + uniform prior on an RGB folder; mlp + Gaussian posterior + mixture
prior; mlp + deterministic + dropout + swiss roll (2-D). The Gaussian prior is the session's
`tiny_model_dir`. The remaining arch x posterior pairs are checked graph by graph.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from aae_runtime.model import AAEModel
from aae_runtime.contract.priors import make_prior_spec, sample_prior
from aae_train.checkpoint import load_checkpoint
from aae_train.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from aae_train.models import build_models, conv_plan
from aae_train.train import train
from export.onnx_export import PARITY_TOLERANCE, export_checkpoint, to_onnx


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory, mnist_test):
    """40 MNIST digits as 36x36 RGB PNG/JPEG files in two subfolders (so labels exist)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("rgb_parts")
    images, labels = mnist_test
    for i in range(40):
        tint = np.stack([images[i], images[i] // 2, 255 - images[i]], axis=-1).astype(np.uint8)
        img = Image.fromarray(tint).resize((36, 36))
        folder = root / ("even" if labels[i] % 2 == 0 else "odd")
        folder.mkdir(exist_ok=True)
        img.save(folder / f"{i}.{'png' if i % 3 else 'jpg'}")
    return root


def _small(arch: str, posterior: str, prior: dict, shape=(1, 28, 28), **model) -> ModelConfig:
    return ModelConfig(image_shape=shape, latent_dim=prior["dim"], arch=arch, hidden=24, posterior=posterior,
                       noise_dim=3, prior=prior, **model)


CASES = {
    "conv-universal-uniform-rgb": lambda mnist_dir, folder: RunConfig(
        model=_small("conv", "universal", make_prior_spec("uniform", 5, low=-2.0, high=2.0), shape=(3, 32, 32)),
        data=DataConfig(source="folder", path=str(folder), image_size=(32, 32), color_mode="RGB", val_fraction=0.25),
        train=TrainConfig(epochs=1, batch_size=10, device="cpu")),
    "mlp-gaussian-mog": lambda mnist_dir, folder: RunConfig(
        model=_small("mlp", "gaussian", make_prior_spec("mog", 4, components=10, radius=4.0)),
        data=DataConfig(source="mnist", path=str(mnist_dir), limit=200, val_fraction=0.25),
        train=TrainConfig(epochs=1, batch_size=50, device="cpu")),
    "mlp-deterministic-swissroll": lambda mnist_dir, folder: RunConfig(
        model=_small("mlp", "deterministic", make_prior_spec("swissroll", 2), dropout=0.3, disc_dropout=0.2),
        data=DataConfig(source="mnist", path=str(mnist_dir), limit=200, val_fraction=0.25),
        train=TrainConfig(epochs=1, batch_size=50, device="cpu", disc_noise=0.1, label_smoothing=0.1,
                            disc_steps=2, code_noise=0.1, ema=0.5)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory, mnist_dir, rgb_folder):
    cfg = CASES[request.param](mnist_dir, rgb_folder)
    run = train(cfg, tmp_path_factory.mktemp(request.param))
    out = tmp_path_factory.mktemp(request.param + "-model")
    result = export_checkpoint(run.checkpoint, out, log=lambda s: None)
    return cfg, run, result, out


def test_export_passes_parity_and_is_deterministic(exported):
    cfg, run, result, out = exported
    assert max(result.max_abs_diff.values()) <= PARITY_TOLERANCE
    model = AAEModel.load(out, device="cpu")
    x = np.random.default_rng(0).random((3, *cfg.model.image_shape), dtype=np.float32)
    z1, z2 = model.encode(x), model.encode(x)
    assert np.array_equal(z1, z2), "sampling noise leaked into the exported encoder"
    # And it is the eval-mode (deterministic) path of the trained encoder.
    state = load_checkpoint(run.checkpoint)
    encoder, _, _ = build_models(cfg.model)
    encoder.load_state_dict(state["encoder"])
    encoder.eval()
    with torch.no_grad():
        np.testing.assert_allclose(z1, encoder(torch.from_numpy(x)).numpy(), atol=PARITY_TOLERANCE)
    assert result.metadata["posterior"]["name"] == cfg.model.posterior


def test_runtime_samples_the_prior_from_metadata_alone(exported):
    cfg, run, result, out = exported
    model = AAEModel.load(out, device="cpu")
    assert model.metadata.prior == cfg.model.prior
    images = model.sample(6, seed=5)
    assert images.shape == (6, *cfg.model.image_shape) and np.isfinite(images).all()
    assert np.array_equal(images, model.sample(6, seed=5))
    state = load_checkpoint(run.checkpoint)
    _, decoder, _ = build_models(cfg.model)
    decoder.load_state_dict(state["decoder"])
    decoder.eval()
    z = sample_prior(cfg.model.prior, 6, np.random.default_rng(5))
    with torch.no_grad():
        np.testing.assert_allclose(images, decoder(torch.from_numpy(z)).numpy(), atol=PARITY_TOLERANCE)



def test_aae_run_sample_works_for_the_prior(exported, tmp_path):
    from typer.testing import CliRunner

    from aae_runtime.cli import app

    cfg, _, _, out = exported
    result = CliRunner().invoke(app, ["sample", "-m", str(out), "-n", "5", "--seed", "1", "-o", str(tmp_path / "s.npy"),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "s.npy").shape == (5, *cfg.model.image_shape)


def test_training_writes_all_plots(exported):
    _, run, _, _ = exported
    from PIL import Image

    from aae_train.plots import PLOT_NAMES

    for name in PLOT_NAMES:
        with Image.open(run.run_dir / name) as img:
            assert img.width > 64 and img.height > 64


@pytest.mark.parametrize("arch,posterior", [("conv", "deterministic"), ("conv", "gaussian"), ("mlp", "universal")])
def test_other_encoders_export_their_deterministic_path(arch, posterior):
    torch.manual_seed(0)
    cfg = _small(arch, posterior, make_prior_spec("gaussian", 3), shape=(1, 16, 16))
    encoder, _, _ = build_models(cfg)
    encoder.train()
    x = torch.rand(7, 1, 16, 16)
    if posterior != "deterministic":
        assert not torch.equal(encoder(x), encoder(x)), "the training path should be stochastic"
    encoder.eval()
    proto = to_onnx(encoder, (x[:2],), ("image",), ("latent",))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        got = session.run(None, {"image": x[:batch].numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, encoder(x[:batch]).numpy(), atol=PARITY_TOLERANCE)


def test_conv_plan_halves_even_sides_down_to_about_four():
    assert [p[1:] for p in conv_plan((3, 64, 64))] == [(32, 32), (16, 16), (8, 8), (4, 4)]
    assert [p[1:] for p in conv_plan((1, 28, 28))] == [(14, 14), (7, 7)]
    assert conv_plan((1, 15, 15)) == []  # odd sides: no halving, the conv net degenerates to an MLP
    for shape in ((1, 28, 28), (3, 48, 32), (1, 15, 15)):
        cfg = _small("conv", "deterministic", make_prior_spec("gaussian", 2), shape=shape)
        encoder, decoder, _ = build_models(cfg)
        assert decoder(encoder(torch.rand(2, *shape))).shape == (2, *shape)
