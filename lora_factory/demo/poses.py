"""How each drawn figure stands and is built: the demo world's pose variety.

Real booru pictures of one character differ in pose and proportions. If every figure
of an outfit were drawn identically, the cleaning chain's person-level near-duplicate
filter would rightly keep only one person per outfit, so every figure gets its own
`FigurePose`: arm angles, stance, build, head size, hair and hem length, eyes, and
which side the asymmetric details (hair ribbon, a held bag) are on.

The ranges keep what the built-in tiny vision models rely on: arms point downwards
(nothing but the head rises above the shoulders, so the head is still everything above
the first mostly-garment row), a figure stays more than twice as tall as it is wide
(the half-body detector cuts full figures at the hips), and eyes, hair and ornaments
keep enough area for their colours to be seen.

Lengths are figure units (the figure is 100 tall, x = 0 is its centre line); a side
is -1 for the viewer's left and +1 for the viewer's right.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

Point = tuple[float, float]

# The middle of the arm's top end: on the torso's top corner, so that the arm overlaps
# the body there whatever its angle (a figure must stay one run of occupied columns).
SHOULDER_X, SHOULDER_Y = 11.0, 27.5
UPPER_ARM, FOREARM, ARM_WIDTH = 14.5, 15.8, 3.6
LEG_TOP, LEG_BOTTOM = 60.0, 96.0


@dataclass(frozen=True)
class FigurePose:
    """One figure's pose and build; the defaults draw the plain standing figure.

    Pairs are (viewer's left, viewer's right). Arm angles are degrees out from straight
    down; a forearm angle below the upper arm's bends the arm at the elbow, negative
    ones point the hand back in (a hand on the hip, hands held in front or behind).
    """

    body_width: float = 1.0  # torso, shoulders and hems, as a factor
    head_scale: float = 1.0  # head, hair and ornaments, scaled from the top of the figure
    hair_volume: float = 1.0  # short hair's width, as a factor
    upper_arm_angles: tuple[float, float] = (7.6, 7.6)
    forearm_angles: tuple[float, float] = (7.6, 7.6)
    arms_behind: tuple[bool, bool] = (False, False)  # drawn behind the body
    sleeve_length: float = 0.44  # share of the arm the top's sleeves cover
    top_hem: float = 55.0  # where the top (not a dress) ends, over the waist at 53
    trouser_end: float = 95.0
    leg_angles: tuple[float, float] = (0.0, 0.0)  # degrees each leg leans out
    hem_length: float = 1.0  # skirt and dress length, as a factor
    hem_flare: float = 1.0  # skirt and dress width at the hem, as a factor
    hair_end: float = 52.0  # where long hair ends (the locks in front end 8 units higher)
    eye_width: float = 1.0  # as a factor
    eye_offset: float = 0.0  # added to each eye's distance from the centre line
    ribbon_side: int = 1  # the side of the head the hair ribbon is on
    bag_side: int = 0  # the hand holding a bag; 0: empty hands

    def arm(self, side: int) -> list[Point]:
        """Shoulder, elbow and hand: the middle line of the arm."""
        shoulder = (side * SHOULDER_X * self.body_width, SHOULDER_Y)
        index = 0 if side < 0 else 1
        elbow = _step(shoulder, side, self.upper_arm_angles[index], UPPER_ARM)
        return [shoulder, elbow, _step(elbow, side, self.forearm_angles[index], FOREARM)]

    def foot_shift(self, side: int) -> float:
        """How far the foot on `side` stands out from where a straight leg would put it."""
        angle = self.leg_angles[0 if side < 0 else 1]
        return side * (LEG_BOTTOM - LEG_TOP) * math.tan(math.radians(angle))


def _step(start: Point, side: int, angle: float, length: float) -> Point:
    """The point `length` away from `start`, `angle` degrees out from straight down."""
    radians = math.radians(angle)
    return start[0] + side * length * math.sin(radians), start[1] + length * math.cos(radians)


@dataclass(frozen=True)
class _Arm:
    upper: float
    forearm: float
    behind: bool = False

    @property
    def straight(self) -> bool:
        return self.upper == self.forearm


def _random_arm(rng: random.Random) -> _Arm:
    """Hanging straight, a hand on the hip, a hand held in front or behind the back.

    Bent arms turn back far enough to put the hand on the body (>= 2 units inside the
    shoulder), so the elbow never hangs loose beside the figure.
    """
    style = rng.choices(("hanging", "hip", "front", "behind"), weights=(4, 3, 2, 2))[0]
    if style == "hanging":
        angle = rng.uniform(2.0, 14.0)
        return _Arm(angle, angle)
    if style == "hip":
        return _Arm(rng.uniform(15.0, 28.0), rng.uniform(-60.0, -35.0))
    return _Arm(rng.uniform(3.0, 12.0), rng.uniform(-75.0, -45.0), behind=style == "behind")


def random_pose(rng: random.Random) -> FigurePose:
    """A pose within the ranges the tiny vision models handle (see the module docstring).

    The widest pose (wide build, arms out, a bag) stays under 42 units wide, well under half
    the figure's height. Heads shrink only a little and eyes stay near their size: the
    faces of small figures are marginal for the tiny face detector (it needs skin around
    the eyes) and tagger (it needs eye area against all the hair and skin).
    """
    left_arm, right_arm = _random_arm(rng), _random_arm(rng)
    ribbon_side = rng.choice((-1, 1))
    straight = [side for side, arm in ((-1, left_arm), (1, right_arm)) if arm.straight]  # can hold a bag
    bag_side = rng.choice(straight) if straight and rng.random() < 0.4 else 0
    return FigurePose(
        body_width=rng.uniform(0.88, 1.12),
        head_scale=rng.uniform(0.96, 1.08),
        hair_volume=rng.uniform(0.95, 1.15),
        upper_arm_angles=(left_arm.upper, right_arm.upper),
        forearm_angles=(left_arm.forearm, right_arm.forearm),
        arms_behind=(left_arm.behind, right_arm.behind),
        sleeve_length=rng.uniform(0.25, 0.85),  # the hand always shows
        top_hem=rng.uniform(54.0, 60.0),
        trouser_end=rng.uniform(78.0, 95.0),
        leg_angles=(rng.uniform(0.0, 12.0), rng.uniform(0.0, 12.0)),
        hem_length=rng.uniform(0.8, 1.25),
        hem_flare=rng.uniform(0.85, 1.15),
        hair_end=rng.uniform(44.0, 58.0),
        eye_width=rng.uniform(0.95, 1.05),
        eye_offset=rng.uniform(-0.4, 0.4),
        ribbon_side=ribbon_side,
        bag_side=bag_side,
    )
