"""The embedded data's camera and scanner, in numbers: what the renderer (depthpipe.data.synthetic)
draws from, and what the params check (depthpipe.config) reads to refuse a valid depth range the
rendered data cannot fill. Plain arithmetic, no numpy: every stage imports the params check.
"""

from __future__ import annotations

import math

# DIODE's camera at 1024x768 (DIODE devkit / Vasiljevic et al. 2019): 60 x 45 degree field of view.
DIODE_FX, DIODE_FY, DIODE_WIDTH, DIODE_HEIGHT = 886.81, 927.06, 1024, 768
SCANNER_RANGE = 350.0  # metres: beyond it the FARO scanner gets no return (mask 0)
CAMERA_HEIGHT = (1.0, 2.0)  # metres above the ground, drawn per scan
PITCH_DEGREES = (-6.0, 8.0)  # drawn per view; positive looks up


def nearest_ground_depth() -> float:
    """The smallest z-depth of ground any view can show: the lowest camera, pitched down the
    most, at the bottom edge of the frame. Every view has ground below its horizon there, so a
    valid depth range below this leaves the embedded data without a valid ground pixel."""
    down = math.radians(-PITCH_DEGREES[0])
    bottom_ray = (DIODE_HEIGHT / 2) / DIODE_FY  # camera-y per unit z-depth at the bottom edge
    # World-downward component of that ray per unit z-depth, with the camera pitched down.
    return CAMERA_HEIGHT[0] / (math.sin(down) + math.cos(down) * bottom_ray)
