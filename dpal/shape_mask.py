"""Shape mask (docs/method.md section 4): a per-token foreground weight from one calibrated direction.

The original fitted a 1-component PCA on every batch of teacher patch tokens and min-max scaled it over
the batch, so the mask's sign was arbitrary per batch and an image's mask depended on its batch-mates.
Here the first principal direction is fitted once on a calibration sample of the dataset, its sign is
oriented so that the projection correlates positively with a centre prior (persons are centred in their
crops), and projections are scaled with the calibration's 1st / 99th percentiles and clipped to [0, 1].
The calibration is a handful of plain numbers stored with the cache (``to_dict`` / ``from_dict``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Images are processed in chunks so that fitting on a large calibration sample never holds the whole
# sample in float64 at once.
_FIT_CHUNK_TOKENS = 1 << 20


@dataclass(frozen=True, eq=False)  # tensor fields: compare with to_dict()
class ShapeMaskCalibration:
    """First principal direction of teacher patch tokens, its sign and the projection's percentiles."""

    mean: torch.Tensor  # [D] float32: mean token of the calibration sample
    direction: torch.Tensor  # [D] float32, unit norm, oriented to correlate with the centre prior
    low: float  # 1st percentile of the projection: maps to 0
    high: float  # 99th percentile: maps to 1

    def to_dict(self) -> dict:
        """Plain numbers only (JSON / Zarr attributes)."""
        return {"mean": [float(v) for v in self.mean.tolist()],
                "direction": [float(v) for v in self.direction.tolist()],
                "low": float(self.low), "high": float(self.high)}

    @classmethod
    def from_dict(cls, data: dict) -> "ShapeMaskCalibration":
        missing = {"mean", "direction", "low", "high"} - set(data)
        if missing:
            raise ValueError(f"shape mask calibration is missing {sorted(missing)}; "
                             f"expected keys mean, direction, low, high (got {sorted(data)})")
        mean = torch.tensor(data["mean"], dtype=torch.float32)
        direction = torch.tensor(data["direction"], dtype=torch.float32)
        if mean.ndim != 1 or mean.shape != direction.shape:
            raise ValueError(f"shape mask calibration: mean {tuple(mean.shape)} and direction "
                             f"{tuple(direction.shape)} must be vectors of the same length")
        low, high = float(data["low"]), float(data["high"])
        if not high > low:
            raise ValueError(f"shape mask calibration: high ({high}) must exceed low ({low})")
        return cls(mean=mean, direction=direction, low=low, high=high)


def centre_prior(grid: tuple[int, int]) -> torch.Tensor:
    """Gaussian bump ``[h * w]`` (row-major) centred on the grid, sigma a quarter of each side."""
    h, w = grid
    ys = (torch.arange(h, dtype=torch.float64) - (h - 1) / 2) / (h / 4)
    xs = (torch.arange(w, dtype=torch.float64) - (w - 1) / 2) / (w / 4)
    return torch.exp(-0.5 * (ys[:, None] ** 2 + xs[None, :] ** 2)).reshape(-1)


def _chunks(patch_tokens: torch.Tensor):
    images_per_chunk = max(1, _FIT_CHUNK_TOKENS // patch_tokens.shape[1])
    for start in range(0, patch_tokens.shape[0], images_per_chunk):
        yield patch_tokens[start:start + images_per_chunk].double().reshape(-1, patch_tokens.shape[2])


def _percentile(values: torch.Tensor, q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of a 1-D tensor of any length."""
    ordered = values.sort().values
    position = q / 100 * (len(ordered) - 1)
    below = int(position)
    above = min(below + 1, len(ordered) - 1)
    return float(ordered[below] + (ordered[above] - ordered[below]) * (position - below))


def fit_shape_mask(patch_tokens: torch.Tensor, grid: tuple[int, int], *, low_percentile: float = 1.0,
                   high_percentile: float = 99.0) -> ShapeMaskCalibration:
    """Fit the calibration on teacher patch tokens ``[M, N, D]`` of M images on a ``grid`` of N = h * w tokens."""
    if patch_tokens.ndim != 3:
        raise ValueError(f"patch_tokens must be [images, tokens, dim], got shape {tuple(patch_tokens.shape)}")
    num_images, num_tokens, dim = patch_tokens.shape
    if num_tokens != grid[0] * grid[1]:
        raise ValueError(f"patch_tokens has {num_tokens} tokens per image but the grid {tuple(grid)} has "
                         f"{grid[0] * grid[1]} (pass patch tokens only, without CLS)")
    if num_images * num_tokens < 2:
        raise ValueError("fit_shape_mask needs at least two tokens")
    count = num_images * num_tokens
    mean = sum(chunk.sum(dim=0) for chunk in _chunks(patch_tokens)) / count
    covariance = sum((chunk - mean).T @ (chunk - mean) for chunk in _chunks(patch_tokens)) / (count - 1)
    direction = torch.linalg.eigh(covariance).eigenvectors[:, -1]  # largest eigenvalue last
    projection = torch.cat([(chunk - mean) @ direction for chunk in _chunks(patch_tokens)])
    prior = centre_prior(grid).to(projection).repeat(num_images)
    correlation = ((projection - projection.mean()) * (prior - prior.mean())).sum()
    if correlation < 0:  # the eigenvector's sign is arbitrary: make "foreground" mean "high"
        direction, projection = -direction, -projection
    low, high = _percentile(projection, low_percentile), _percentile(projection, high_percentile)
    if not high > low:
        raise ValueError(f"the calibration tokens have no spread along their principal direction "
                         f"(percentiles {low} .. {high}); use more or more varied images")
    return ShapeMaskCalibration(mean=mean.float(), direction=direction.float(), low=low, high=high)


def shape_mask(patch_tokens: torch.Tensor, calibration: ShapeMaskCalibration) -> torch.Tensor:
    """Per-token foreground weight ``[B, N]`` in [0, 1], each image on its own (no batch statistics)."""
    if patch_tokens.ndim != 3 or patch_tokens.shape[-1] != calibration.direction.shape[0]:
        raise ValueError(f"patch_tokens must be [B, N, {calibration.direction.shape[0]}] to match the "
                         f"calibration, got shape {tuple(patch_tokens.shape)}")
    tokens = patch_tokens.float()
    mean = calibration.mean.to(tokens.device)
    direction = calibration.direction.to(tokens.device)
    # A per-token dot product (elementwise then a last-axis sum): each row's value cannot depend on
    # how many rows the batch has, unlike a blocked matmul.
    projection = ((tokens - mean) * direction).sum(dim=-1)
    return ((projection - calibration.low) / (calibration.high - calibration.low)).clamp_(0.0, 1.0)
