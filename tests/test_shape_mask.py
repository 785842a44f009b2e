import json

import pytest
import torch

from dpal.shape_mask import ShapeMaskCalibration, centre_prior, fit_shape_mask, shape_mask

GRID = (8, 4)


def person_like_tokens(num_images, foreground, *, seed, dim=24):
    """Tokens whose dominant variation is ``foreground`` scaled by a per-image centred blob."""
    generator = torch.Generator().manual_seed(seed)
    prior = centre_prior(GRID).float()
    strength = prior[None, :] * (0.5 + torch.rand(num_images, 1, generator=generator))
    noise = 0.05 * torch.randn(num_images, GRID[0] * GRID[1], dim, generator=generator)
    return 3.0 + strength[:, :, None] * 4.0 * foreground + noise


def unit(seed, dim=24):
    v = torch.randn(dim, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_direction_is_oriented_by_centre_prior(sign):
    foreground = sign * unit(1)
    calibration = fit_shape_mask(person_like_tokens(64, foreground, seed=2), GRID)
    # Whichever way the data (and the eigensolver) point, "high" means "like the centre".
    assert float(calibration.direction @ foreground) > 0.99
    mask = shape_mask(person_like_tokens(4, foreground, seed=3), calibration).reshape(4, *GRID)
    centre, corner = mask[:, 3:5, 1:3].mean(), mask[:, :2, :1].mean()
    assert centre > 0.3 and corner < 0.05


def test_mask_of_an_image_does_not_depend_on_batch_mates():
    foreground = unit(4)
    calibration = fit_shape_mask(person_like_tokens(32, foreground, seed=5), GRID)
    batch = person_like_tokens(6, foreground, seed=6)
    alone = torch.cat([shape_mask(batch[i:i + 1], calibration) for i in range(6)])
    others = torch.cat([batch[:1], person_like_tokens(5, -foreground, seed=7)])  # very different mates
    assert torch.equal(shape_mask(batch, calibration), alone)
    assert torch.equal(shape_mask(others, calibration)[0], alone[0])
    assert alone.min() >= 0 and alone.max() <= 1


def test_percentiles_map_to_zero_and_one():
    foreground = unit(8)
    tokens = person_like_tokens(40, foreground, seed=9)
    calibration = fit_shape_mask(tokens, GRID)
    projection = ((tokens.double() - calibration.mean.double()) @ calibration.direction.double()).reshape(-1)
    assert calibration.low == pytest.approx(float(projection.quantile(0.01)), abs=1e-5)
    assert calibration.high == pytest.approx(float(projection.quantile(0.99)), abs=1e-5)
    mask = shape_mask(tokens, calibration).reshape(-1)
    assert 0.005 < float((mask == 0).float().mean()) < 0.02  # ~1% at or below the 1st percentile
    assert 0.005 < float((mask == 1).float().mean()) < 0.02


def test_calibration_round_trips_through_plain_numbers():
    calibration = fit_shape_mask(person_like_tokens(8, unit(10), seed=11), GRID)
    data = json.loads(json.dumps(calibration.to_dict()))
    again = ShapeMaskCalibration.from_dict(data)
    tokens = person_like_tokens(3, unit(10), seed=12)
    assert torch.equal(shape_mask(tokens, again), shape_mask(tokens, calibration))
    assert again.to_dict() == calibration.to_dict()


def test_bad_inputs_name_the_problem():
    calibration = fit_shape_mask(person_like_tokens(8, unit(13), seed=14), GRID)
    with pytest.raises(ValueError, match="grid"):
        fit_shape_mask(torch.randn(2, 33, 24), GRID)
    with pytest.raises(ValueError, match=r"\[B, N, 24\]"):
        shape_mask(torch.randn(2, 32, 16), calibration)
    with pytest.raises(ValueError, match="missing"):
        ShapeMaskCalibration.from_dict({"mean": [0.0], "direction": [1.0]})
    with pytest.raises(ValueError, match="no spread"):
        fit_shape_mask(torch.ones(4, 32, 24), GRID)
