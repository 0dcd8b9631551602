"""GroupNorm sizing of the small networks."""

from __future__ import annotations

import pytest

from models.normalization import norm_groups


@pytest.mark.parametrize(
    "channels, groups",
    [
        ([16, 32, 32], 4),  # the embedded default's VAE: 4 channels per group, not 1
        ([64, 128], 16),
        ([320, 640, 1280], 32),  # Stable Diffusion's widths keep Stable Diffusion's 32
        ([24, 48], 6),
        ([9, 18], 1),  # 9 has no divisor leaving 4 channels per group but 1
    ],
)
def test_groups_divide_every_level_and_keep_four_channels_per_group(channels, groups):
    assert norm_groups(channels) == groups
    assert all(c % groups == 0 and c // groups >= 4 or groups == 1 for c in channels)
