import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from bebop_trl.trainers.acceptance_fit import AcceptanceEntropyFit


def sample(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    entropy = 0.2 + 2.8 * torch.rand(n, generator=generator, dtype=torch.float64)
    noise = 0.1 * torch.randn(n, generator=generator, dtype=torch.float64)
    acceptance = (0.9 - 0.2 * entropy + noise).clamp(0, 1)
    weight = torch.randint(1, 20, (n,), generator=generator)
    return entropy, acceptance, weight


def feed(fit: AcceptanceEntropyFit, entropy, acceptance, weight=None, sizes=(7, 30, 1, 63, 99)) -> None:
    start = 0
    for step, size in enumerate(sizes):
        end = start + size
        fit.update(entropy[start:end], acceptance[start:end], None if weight is None else weight[start:end], step)
        start = end
    assert start == len(entropy)


def reference(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> dict[str, float]:
    slope, intercept = np.polyfit(x, y, 1, w=np.sqrt(w))
    mean_x, mean_y = np.average(x, weights=w), np.average(y, weights=w)
    cov = np.average((x - mean_x) * (y - mean_y), weights=w)
    r = cov / np.sqrt(np.average((x - mean_x) ** 2, weights=w) * np.average((y - mean_y) ** 2, weights=w))
    return {"slope": slope, "intercept": intercept, "r": r, "mean_entropy": mean_x, "mean_acceptance": mean_y}


def assert_matches(result: dict[str, float], expected: dict[str, float]) -> None:
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_weighted_fit_matches_polyfit_and_weighted_pearson():
    entropy, acceptance, weight = sample(200, seed=1)
    fit = AcceptanceEntropyFit()
    feed(fit, entropy, acceptance, weight)
    result = fit.result()
    assert_matches(result, reference(entropy.numpy(), acceptance.numpy(), weight.double().numpy()))
    assert result["num_points"] == 200
    assert result["total_weight"] == pytest.approx(weight.sum().item(), rel=1e-12)
    assert result["slope"] < 0 < result["intercept"]


def test_unweighted_fit_matches_linregress():
    entropy, acceptance, _ = sample(200, seed=2)
    fit = AcceptanceEntropyFit()
    feed(fit, entropy, acceptance)
    expected = stats.linregress(entropy.numpy(), acceptance.numpy())
    assert_matches(fit.result(), {"slope": expected.slope, "intercept": expected.intercept, "r": expected.rvalue})
    assert fit.result()["total_weight"] == 200


def test_nan_acceptance_and_non_positive_weights_are_skipped():
    entropy, acceptance, weight = sample(200, seed=3)
    acceptance[::7] = float("nan")
    weight[::11] = 0
    weight[5] = -3
    entropy[6] = float("nan")
    fit = AcceptanceEntropyFit()
    feed(fit, entropy, acceptance, weight)
    keep = ~acceptance.isnan() & ~entropy.isnan() & (weight > 0)
    expected = reference(entropy[keep].numpy(), acceptance[keep].numpy(), weight[keep].double().numpy())
    result = fit.result()
    assert_matches(result, expected)
    assert result["num_points"] == keep.sum().item() < 200
    assert len(fit.state_dict()["points"]["entropy"]) == keep.sum().item()
    assert not any(math.isnan(value) for value in fit.state_dict()["points"]["acceptance"])


def test_degenerate_data():
    fit = AcceptanceEntropyFit()
    assert fit.result() is None
    fit.update(torch.tensor([1.0]), torch.tensor([0.5]))
    assert fit.result() is None
    fit.update(torch.tensor([2.0, 3.0]), torch.tensor([float("nan"), 0.7]), torch.tensor([4.0, 0.0]))
    assert fit.result() is None  # both new points are skipped

    constant_entropy = AcceptanceEntropyFit()
    generator = torch.Generator().manual_seed(0)
    for step in range(3):
        constant_entropy.update(
            torch.full((5,), 0.7), torch.rand(5, generator=generator), torch.tensor([1.0, 3.0, 0.3, 7.0, 2.0]), step
        )
    assert constant_entropy.result() is None

    constant_acceptance = AcceptanceEntropyFit()
    entropy, _, weight = sample(100, seed=4)
    feed(constant_acceptance, entropy, torch.full((100,), 0.6, dtype=torch.float64), weight, sizes=(33, 67))
    result = constant_acceptance.result()
    assert result["r"] == 0.0
    assert result["slope"] == pytest.approx(0.0, abs=1e-12)
    assert result["intercept"] == pytest.approx(0.6, rel=1e-12)


def kept_points(seed: int, max_points: int = 50) -> tuple[AcceptanceEntropyFit, dict[str, list]]:
    entropy, acceptance, weight = sample(1000, seed=5)
    fit = AcceptanceEntropyFit(max_points=max_points, seed=seed)
    feed(fit, entropy, acceptance, weight, sizes=(30, 40, *[93] * 10))
    return fit, fit.state_dict()["points"]


def test_subsampling_keeps_a_reproducible_uniform_sample_but_fits_all_points():
    fit, points = kept_points(seed=0)
    assert all(len(values) == 50 for values in points.values())
    assert fit.result()["num_points"] == 1000
    entropy, acceptance, weight = sample(1000, seed=5)
    assert_matches(fit.result(), reference(entropy.numpy(), acceptance.numpy(), weight.double().numpy()))
    originals = set(zip(entropy.tolist(), acceptance.tolist(), weight.double().tolist(), strict=True))
    kept = list(zip(points["entropy"], points["acceptance"], points["weight"], strict=True))
    assert len(set(kept)) == 50 and set(kept) <= originals

    assert kept_points(seed=0)[1] == points
    assert kept_points(seed=1)[1] != points

    # Uniform over the run: steps 7 to 11 hold 465 of the 1000 points, so on average 46.5% of the kept points come
    # from them; keeping the first points seen would give none, keeping the last ones all.
    late = [sum(step >= 7 for step in kept_points(seed)[1]["step"]) / 50 for seed in range(20)]
    assert np.mean(late) == pytest.approx(0.465, abs=0.05)


def test_state_dict_round_trip_continues_identically():
    entropy, acceptance, weight = sample(400, seed=6)
    fit = AcceptanceEntropyFit(max_points=60, seed=3)
    feed(fit, entropy[:200], acceptance[:200], weight[:200], sizes=(50, 150))
    resumed = AcceptanceEntropyFit(seed=99)
    resumed.load_state_dict(json.loads(json.dumps(fit.state_dict())))
    assert resumed.result() == fit.result()
    assert resumed.state_dict() == fit.state_dict()

    before = fit.state_dict()["points"]
    for model in (fit, resumed):
        feed(model, entropy[200:], acceptance[200:], weight[200:], sizes=(120, 80))
    assert resumed.result() == fit.result()
    assert resumed.result()["num_points"] == 400
    assert resumed.state_dict()["points"] == fit.state_dict()["points"]
    assert fit.state_dict()["points"] != before  # the later rounds replaced some kept points


def test_save_json_and_plot(tmp_path):
    empty = AcceptanceEntropyFit()
    assert empty.save_plot(tmp_path / "empty.png") is False
    assert not (tmp_path / "empty.png").exists()
    empty.save_json(tmp_path / "empty.json")
    assert json.loads((tmp_path / "empty.json").read_text()) == {
        "fit": None,
        "points": {"entropy": [], "acceptance": [], "weight": [], "step": []},
    }

    entropy, acceptance, weight = sample(200, seed=7)
    fit = AcceptanceEntropyFit()
    feed(fit, entropy, acceptance, weight)
    fit.save_json(tmp_path / "fit.json")
    saved = json.loads((tmp_path / "fit.json").read_text())
    assert saved["fit"] == fit.result()
    assert saved["points"]["entropy"] == entropy.tolist()
    assert saved["points"]["step"] == [0] * 7 + [1] * 30 + [2] + [3] * 63 + [4] * 99

    assert fit.save_plot(tmp_path / "fit.png", title="acceptance vs entropy") is True
    data = (tmp_path / "fit.png").read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 1000


@pytest.mark.parametrize(
    "entropy, acceptance, weight",
    [
        (torch.rand(2, 3), torch.rand(2, 3), None),
        (torch.tensor(0.5), torch.tensor(0.5), None),
        (torch.rand(3), torch.rand(4), None),
        (torch.rand(3), torch.rand(3), torch.ones(2)),
        (torch.rand(3), torch.rand(3), torch.ones(3, 1)),
    ],
)
def test_bad_shapes_raise(entropy, acceptance, weight):
    fit = AcceptanceEntropyFit()
    with pytest.raises(ValueError, match=r"entropy|acceptance|weight"):
        fit.update(entropy, acceptance, weight)
    assert fit.result() is None and fit.state_dict()["num_points"] == 0


def test_metrics_and_save_into_a_folder(tmp_path):
    fit = AcceptanceEntropyFit()
    assert fit.metrics() == {}  # undefined before two points
    fit.update(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.6, 0.5, 0.3]), step=1)
    result = fit.result()
    assert fit.metrics() == {f"acceptance_entropy/{name}": result[name] for name in ("slope", "intercept", "r")}
    fit.save(tmp_path / "run", "fit", plot=False)
    assert json.loads((tmp_path / "run" / "fit.json").read_text())["fit"] == result
    assert not (tmp_path / "run" / "fit.png").exists()
    fit.save(tmp_path / "run", "fit")
    assert (tmp_path / "run" / "fit.png").is_file()
