"""Tiny fixed-weight vision models for the demo world, built as real ONNX files.

Each tiny model has exactly the inputs, outputs, side files and metadata of the real
model it stands in for (WD14 tagger, CCIP identity, YOLOv8 detectors, deepghs
classifiers), so every wrapper and every pipeline step runs unchanged on either. They
are not trained and not random: their weights are read off the demo world's colour
vocabulary (`lora_factory.demo.palette`), its characters and its figure layout
(`lora_factory.demo.drawing`), which is what lets the demo's results make sense.
Accuracy on drawn figures (JPEG 65-92, full pictures and cleaning's crops) is measured
by the tests in `test_vision_tiny_models.py`.

How they see, all inside the ONNX graph:
- Colour matching. The input is turned back into RGB 0..255 (undoing each real model's
  normalisation); one matrix product gives every pixel's squared distance to every
  world colour (|x|^2 - 2 x.c + |c|^2). A pixel "is" a colour when it lies within
  `COLOUR_RADIUS` of it (world colours are >= 60 apart). Masks are eroded with a 3x3
  min filter, so the thin blends that resizing and JPEG leave along edges (red hair
  against a green dress reads brown) do not count as colours of their own.
- Presence of a tag colour = sigmoid(gain * ln(share / f0)), the share being relative
  to the figure (hair, garments) or to the head (eyes, features), which makes it
  independent of framing and scale (see PRESENCE_F0).
- Tagger (WD14 v3 signature): colour tags are presences (zeroed in greyscale
  pictures); a garment noun (`shirt`) is the max of its coloured tags; greyscale and
  monochrome come from the share of chromatic pixels; backgrounds from the share of
  background pixels; `solo` counts people found as the person detector finds them;
  `1girl`/`1boy` read the demo world's dress code (skirts and dresses vs trousers) in
  solo pictures; `long_hair` means hair below the head (long locks over the
  shoulders); a character tag is the min of the presences of the character's hair,
  eyes and features; ratings follow the share of skin among figure pixels.
- Identity (CCIP signature): the feature is the presence of every tag colour, hair,
  eyes and features weighted heavily and garments lightly, with colours read softly
  (a pixel counts as its nearest world colour unless it is far from all of them, so
  blurred, re-encoded or slightly off-colour generations are still recognised, as
  real CCIP recognises imperfect generations) and each hair and eye colour weighed by
  its share of the group's largest (stray blobs barely count), rotated into 768-d by a
  fixed orthonormal (DCT) basis. Crops of one character share hair and eyes whatever
  the outfit or framing; two characters share neither. The metrics model returns
  (1 - cosine) / 2; `metrics.json` holds the threshold between the two.
- Detectors (YOLOv8 export signature, letterboxed 640 input, [N, 5, 8400] output):
  demo pictures hold figures side by side with gaps, so figures are found by
  projection: the foreground (neither background nor letterbox grey, eroded) is summed
  per column, runs of occupied columns are figures, and a figure's box is the extent
  of its foreground. The head is the part of a figure above its first row that is
  mostly garment; the face is the head's skin-and-eyes region without rows narrower
  than 45% of the widest (the neck), raised by half its height (the forehead under the
  bangs); the half body is the upper 57.5% of a full figure (the drawing's hips line).
  Confidence grows with the evidence (figure-like aspect and size, hair and skin in a
  head, eye pixels in a face). Up to `MAX_FIGURES` boxes go to the first anchors; the
  other anchors score 0. Everything is matrix products and reductions on a 320x320
  subsample (every second pixel, which keeps colours pure): ~20 ms a picture on a CPU.
- Classifiers (deepghs signature, [N,3,384,384] in, probabilities out): monochrome from
  the chromatic share; anime classification from flatness (share of figure pixels that
  are exactly world colours) and monochrome; rating from the skin share of figure
  pixels; aesthetic from flatness (crisp flat colour = clean, JPEG or resampling blur =
  worse, noise = worst).
"""

from __future__ import annotations

import csv
import functools
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lora_factory.demo.booru import UNRELATED_CHARACTERS
from lora_factory.demo.characters import DEMO_CHARACTERS, DemoCharacter
from lora_factory.demo.palette import (
    BACKGROUNDS,
    EYE_COLOURS,
    FEATURE_COLOURS,
    GARMENT_COLOURS,
    HAIR_COLOURS,
    SKIN,
)
from lora_factory.storage import atomic_write_bytes
from lora_factory.vision.registry import BUILTIN_SPECS, DEFAULT_MODELS, ModelRegistry, ModelSpec

OPSET = 18
IR_VERSION = 8
COLOUR_RADIUS = 28.0  # < half the 60 minimum distance between world colours
LETTERBOX_GREY = (114, 114, 114)
BACKGROUND_COLOURS = [*BACKGROUNDS.values(), LETTERBOX_GREY]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TAGGER_SIZE = 448
IDENTITY_SIZE = 384
IDENTITY_DIM = 768
DETECTOR_SIZE = 640
DETECTOR_ANCHORS = 8400  # 80x80 + 40x40 + 20x20 grid cells of a 640 YOLOv8 model
CLASSIFIER_SIZE = 384
MAX_FIGURES = 8

# Presence: sigmoid(PRESENCE_GAIN * ln(share / f0)), where share is the colour's eroded
# area relative to the figure (hair, garments) or to the head (eyes, features: head =
# hair + skin + eyes + features). Relative shares do not depend on framing or scale,
# and blends that survive erosion in upscaled crops stay far below f0: measured on
# drawn figures (full / half / head crops, JPEG 65-92) present shares are >= 2.5x f0
# and absent ones <= f0 / 2.5.
PRESENCE_GAIN = 3.0
PRESENCE_F0 = {"hair": 3.5e-3, "eyes": 2.5e-3, "features": 2e-3, "garments": 8e-3}
PRESENCE_RELATIVE_TO = {"hair": "figure", "eyes": "head", "features": "head", "garments": "figure"}
# Hair below the head / hair in the head: 0 for short hair; long hair's locks over the
# shoulders give >= 0.1 (head crops) to ~0.4 (full figures).
LONG_HAIR_BELOW_SHARE = 0.04
# Framing from the share of a figure's height that is head (above its first garment
# row). Measured on drawn figures: portraits 0.67-0.79 (head crops included), upper
# bodies 0.39-0.46, full bodies 0.25-0.29; the cuts sit between.
PORTRAIT_HEAD_SHARE = 0.55
FULL_BODY_HEAD_SHARE = 0.34
# Identity feature weights per tag group: core tags define who it is.
IDENTITY_WEIGHTS = {"hair": 1.0, "eyes": 1.0, "features": 1.0, "garments": 0.3}
# Measured on drawn crops: same character <= 0.03, different characters >= 0.47. The
# real CCIP model's threshold (~0.1785) sits between, so the two read alike.
IDENTITY_THRESHOLD = 0.1785
# The identity model reads colours softly (`_soft_colours_outside`), as real CCIP still
# recognises imperfect generations: colours 60 apart stay apart (a pixel on one colour
# gives the next e^-8 of its weight), a pixel 35 off its colour still counts ~0.9 for it.
ONE_COLOUR_GROUPS = ("hair", "eyes")
SOFT_COLOUR_SIGMA = 15.0
SOFT_NONE_DISTANCE = 50.0

TAG_GROUPS: dict[str, dict[str, tuple[int, int, int]]] = {
    "hair": HAIR_COLOURS,
    "eyes": EYE_COLOURS,
    "features": FEATURE_COLOURS,
    "garments": GARMENT_COLOURS,
}
COLOUR_TAGS: tuple[str, ...] = tuple(tag for group in TAG_GROUPS.values() for tag in group)
TAG_GROUP_OF = {tag: group for group, tags in TAG_GROUPS.items() for tag in tags}
TAG_RGB = {tag: rgb for group in TAG_GROUPS.values() for tag, rgb in group.items()}
GARMENT_NOUNS: dict[str, tuple[str, ...]] = {}
for _garment in GARMENT_COLOURS:
    GARMENT_NOUNS.setdefault(_garment.rsplit("_", 1)[-1], ())
    GARMENT_NOUNS[_garment.rsplit("_", 1)[-1]] += (_garment,)
GIRL_GARMENTS = ("skirt", "dress")
BOY_GARMENTS = ("pants",)
TAGGER_CHARACTERS: tuple[DemoCharacter, ...] = DEMO_CHARACTERS + UNRELATED_CHARACTERS

RATING_TAGS = ("general", "sensitive", "questionable", "explicit")
# Ratings follow the share of skin among figure pixels (demo figures show ~10-35%).
RATING_SKIN_SHARES = {"sensitive": 0.6, "questionable": 0.75, "explicit": 0.9}

DETECTOR_LABELS = {"tiny-person": "person", "tiny-halfbody": "halfbody", "tiny-head": "head", "tiny-face": "face"}
CLASSIFIER_LABELS = {
    "tiny-monochrome": ("monochrome", "normal"),
    "tiny-classification": ("3d", "bangumi", "comic", "illustration"),
    "tiny-rating": ("safe", "r15", "r18"),
    "tiny-aesthetic": ("masterpiece", "best", "great", "good", "normal", "low", "worst"),
}
# Flatness (share of figure pixels that are exactly world colours) at which each
# aesthetic class is most likely: crisp PNGs ~0.94, JPEG re-encodes, resized and
# upscaled copies lower, noise or photographs far lower.
AESTHETIC_FLATNESS = {
    "masterpiece": 0.94,
    "best": 0.92,
    "great": 0.90,
    "good": 0.87,
    "normal": 0.82,
    "low": 0.72,
    "worst": 0.5,
}
AESTHETIC_WIDTH = 0.02


# --------------------------------------------------------------------- graph builder
class _Graph:
    """A thin ONNX graph builder: every op returns the name of its output tensor."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, value, dtype=np.float32, hint: str = "c") -> str:
        name = self._name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def ints(self, values: Sequence[int]) -> str:
        return self.const(list(values), np.int64, "i")

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        output = out or self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], **attrs))
        return output

    # Arithmetic with python numbers turned into constants.
    def _operand(self, value) -> str:
        return value if isinstance(value, str) else self.const(value)

    def add(self, a, b) -> str:
        return self.op("Add", self._operand(a), self._operand(b))

    def sub(self, a, b) -> str:
        return self.op("Sub", self._operand(a), self._operand(b))

    def mul(self, a, b) -> str:
        return self.op("Mul", self._operand(a), self._operand(b))

    def div(self, a, b) -> str:
        return self.op("Div", self._operand(a), self._operand(b))

    def min(self, *values) -> str:
        return self.op("Min", *[self._operand(v) for v in values])

    def max(self, *values) -> str:
        return self.op("Max", *[self._operand(v) for v in values])

    def clip(self, x: str, low: float, high: float) -> str:
        return self.op("Clip", x, self.const(low), self.const(high))

    def sigmoid(self, x: str) -> str:
        return self.op("Sigmoid", x)

    def log(self, x: str) -> str:
        return self.op("Log", x)

    def flag(self, op_type: str, a, b) -> str:
        """A comparison as a float 0/1 tensor."""
        return self.op("Cast", self.op(op_type, self._operand(a), self._operand(b)), to=TensorProto.FLOAT)

    def reduce(self, op_type: str, x: str, axes: Sequence[int], keepdims: int = 0) -> str:
        return self.op(op_type, x, self.ints(axes), keepdims=keepdims)

    def transpose(self, x: str, perm: Sequence[int]) -> str:
        return self.op("Transpose", x, perm=list(perm))

    def concat(self, values: Sequence[str], axis: int) -> str:
        return self.op("Concat", *values, axis=axis)

    def gather(self, x: str, indices: Sequence[int], axis: int) -> str:
        return self.op("Gather", x, self.ints(indices), axis=axis)

    def model(
        self,
        inputs: Sequence[onnx.ValueInfoProto],
        outputs: Sequence[onnx.ValueInfoProto],
        name: str,
        metadata: dict[str, str] | None = None,
    ) -> bytes:
        graph = helper.make_graph(self.nodes, name, list(inputs), list(outputs), self.initializers)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            ir_version=IR_VERSION,
            producer_name="lora_factory.tiny_models",
        )
        for key, value in (metadata or {}).items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(model, full_check=True)
        return model.SerializeToString()


def _float_tensor(name: str, shape: Sequence[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


# ------------------------------------------------------------------ colour analysis
def _colour_distances(g: _Graph, rgb: str, size: int, colours: np.ndarray) -> tuple[str, np.ndarray]:
    """[N,K,HW] |x|^2 - 2 x.c for every pixel and colour (one matrix product), and the
    [K,1] limits it is compared with: within COLOUR_RADIUS <=> distance < limit."""
    pixels = g.op("Reshape", rgb, g.ints([0, 3, size * size]))  # [N,3,HW], rgb 0..255
    squared = g.reduce("ReduceSum", g.mul(pixels, pixels), [1], keepdims=1)
    weights = np.concatenate([-2.0 * colours, np.ones((len(colours), 1), dtype=np.float32)], axis=1)
    distances = g.op("MatMul", g.const(weights), g.concat([pixels, squared], axis=1))
    return distances, (COLOUR_RADIUS**2 - (colours**2).sum(axis=1)).reshape(-1, 1)


def _colour_groups(g: _Graph, rgb: str, size: int, groups: Sequence[Sequence[tuple[int, int, int]]]) -> str:
    """[N,G,size,size] float 0/1: pixel within COLOUR_RADIUS of any colour of each group
    (a product with a 0/1 membership matrix gathers colour matches into groups)."""
    distinct = list(dict.fromkeys(colour for group in groups for colour in group))
    distances, limits = _colour_distances(g, rgb, size, np.asarray(distinct, dtype=np.float32))
    matches = g.flag("Less", distances, limits)
    membership = np.zeros((len(groups), len(distinct)), dtype=np.float32)
    for row, group in enumerate(groups):
        membership[row, [distinct.index(colour) for colour in group]] = 1.0
    if not np.array_equal(membership, np.eye(len(distinct), dtype=np.float32)):
        matches = g.min(g.op("MatMul", g.const(membership), matches), 1.0)
    return g.op("Reshape", matches, g.ints([0, len(groups), size, size]))


def _colours_outside(g: _Graph, rgb: str, size: int, colours: Sequence[tuple[int, int, int]]) -> str:
    """[N,K,size,size] float 0/1: 1 where a pixel is NOT within COLOUR_RADIUS of each colour.

    The complement is what erosion and fractions need (see `_eroded_fractions`), which
    saves `1 - x` passes over big tensors.
    """
    distances, limits = _colour_distances(g, rgb, size, np.asarray(colours, dtype=np.float32))
    return g.op("Reshape", g.flag("GreaterOrEqual", distances, limits), g.ints([0, len(colours), size, size]))


def _soft_colours_outside(g: _Graph, rgb: str, size: int, colours: Sequence[tuple[int, int, int]]) -> str:
    """[N,K,size,size] in 0..1: 1 - the pixel's soft membership of each colour.

    Membership is a softmax of -d^2 / (2 SOFT_COLOUR_SIGMA^2) over the colours and one
    "none of them" option at SOFT_NONE_DISTANCE: a pixel counts as its nearest colour
    even when it is 30-40 off (blur, JPEG, an imperfect autoencoder, a colour cast),
    while a pixel far from every colour belongs to none.
    """
    colours = np.asarray(colours, dtype=np.float32)
    partial, _ = _colour_distances(g, rgb, size, colours)
    squared = g.add(partial, g.const((colours**2).sum(axis=1).reshape(-1, 1)))  # [N,K,HW]
    scale = -1.0 / (2.0 * SOFT_COLOUR_SIGMA**2)
    logits = g.mul(squared, scale)
    none_logit = SOFT_NONE_DISTANCE**2 * scale
    top = g.max(g.reduce("ReduceMax", logits, [1], keepdims=1), none_logit)  # for a stable exp
    weights = g.op("Exp", g.sub(logits, top))
    total = g.add(g.reduce("ReduceSum", weights, [1], keepdims=1), g.op("Exp", g.sub(none_logit, top)))
    outside = g.sub(1.0, g.div(weights, total))
    return g.op("Reshape", outside, g.ints([0, len(colours), size, size]))


def _eroded_fractions(g: _Graph, outside: str) -> str:
    """[N,K]: share of pixels of each colour after a 3x3 erosion, from outside masks."""
    grown_outside = g.op("MaxPool", outside, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    return g.sub(1.0, g.reduce("ReduceMean", grown_outside, [2, 3]))


def _channels(g: _Graph, x: str, start: int, stop: int | None = None) -> str:
    """Channels start..stop (default: just `start`) of a [N,C,...] tensor, keeping the axis."""
    return g.op("Slice", x, g.ints([start]), g.ints([start + 1 if stop is None else stop]), g.ints([1]))


def _erode(g: _Graph, masks: str) -> str:
    """3x3 min filter of 0/1 masks: drops regions thinner than 3 pixels (edge blends)."""
    grown_background = g.op("MaxPool", g.sub(1.0, masks), kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    return g.sub(1.0, grown_background)


def _subsample(g: _Graph, images: str, size: int) -> str:
    """Every second pixel: halves the work and, unlike averaging, mixes no colours."""
    return g.op("Slice", images, g.ints([0, 0]), g.ints([size, size]), g.ints([2, 3]), g.ints([2, 2]))


ANALYSIS_COLOURS = [*TAG_RGB.values(), SKIN, *BACKGROUND_COLOURS]


class _ColourAnalysis:
    """Eroded shares of every tag colour, skin and the figure in RGB pictures.

    `fractions` [N,T] and `skin` [N,1] are shares of the picture; `figure` [N,1] is
    the eroded share of non-background pixels; `presence` [N,T] as PRESENCE_F0 says.
    `tag_outside` [N,T,H,W] / `background_outside` [N,B,H,W] are 1 where a pixel is
    not that tag / background colour. With `soft`, colours are soft memberships
    (`_soft_colours_outside`) instead of within-COLOUR_RADIUS tests.
    """

    def __init__(self, g: _Graph, rgb: str, size: int, soft: bool = False):
        tags = len(COLOUR_TAGS)
        outside = (_soft_colours_outside if soft else _colours_outside)(g, rgb, size, ANALYSIS_COLOURS)
        eroded = _eroded_fractions(g, _channels(g, outside, 0, tags + 1))
        self.tag_outside = _channels(g, outside, 0, tags)
        self.fractions = _channels(g, eroded, 0, tags)
        self.skin = _channels(g, eroded, tags)
        self.background_outside = _channels(g, outside, tags + 1, len(ANALYSIS_COLOURS))
        # Figure = outside every background colour; eroding it = 1 - (3x3 max of background).
        background = g.sub(1.0, g.reduce("ReduceMin", self.background_outside, [1], keepdims=1))
        grown = g.op("MaxPool", background, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        self.figure = g.sub(1.0, g.reduce("ReduceMean", grown, [2, 3]))
        head_tags = [i for i, tag in enumerate(COLOUR_TAGS) if TAG_GROUP_OF[tag] != "garments"]
        head = g.add(_columns(g, self.fractions, head_tags, "ReduceSum"), self.skin)
        # [N,2] (figure, head) @ [2,T] picks each tag's reference area.
        selection = np.asarray(
            [[PRESENCE_RELATIVE_TO[TAG_GROUP_OF[tag]] == area for tag in COLOUR_TAGS] for area in ("figure", "head")],
            dtype=np.float32,
        )
        reference = g.op("MatMul", g.concat([self.figure, head], axis=1), g.const(selection))
        f0 = np.asarray([PRESENCE_F0[TAG_GROUP_OF[tag]] for tag in COLOUR_TAGS], dtype=np.float32)
        # The epsilons keep empty pictures (no figure, no head) at "absent".
        shares = g.div(g.add(self.fractions, 1e-6), g.add(reference, 1e-3))
        self.presence = g.sigmoid(g.mul(g.log(g.div(shares, f0)), PRESENCE_GAIN))


def _columns(g: _Graph, x: str, indices: Sequence[int], reduce_op: str = "ReduceMax") -> str:
    """[N,1]: `reduce_op` over the given columns of a [N,T] tensor."""
    return g.reduce(reduce_op, g.gather(x, indices, axis=1), [1], keepdims=1)


# ------------------------------------------------------------------ figure geometry
class _Figures:
    """Figure boxes by column projection of a [N,1,R,R] foreground mask.

    All box tensors are [N,S] floats in working pixels (S = MAX_FIGURES); an index
    tensor `idx` [1,1,R] numbers rows/columns for first/last-index reductions.
    """

    BIG = 1.0e6

    def __init__(self, g: _Graph, foreground: str, size: int, min_column_count: float = 2.0):
        self.g, self.size = g, size
        self.idx = g.const(np.arange(size, dtype=np.float32).reshape(1, 1, size))
        self.foreground = g.op("Squeeze", foreground, g.ints([1]))  # [N,R,R]
        column_counts = g.reduce("ReduceSum", foreground, [2])  # [N,1,R] (sum over rows)
        occupied = g.flag("GreaterOrEqual", column_counts, min_column_count)
        before = g.op(
            "Slice", g.op("Pad", occupied, g.ints([0, 0, 1, 0, 0, 0])), g.ints([0]), g.ints([size]), g.ints([2])
        )
        starts = g.mul(occupied, g.sub(1.0, before))
        run_number = g.mul(g.op("CumSum", starts, g.const(2, np.int64)), occupied)  # [N,1,R]
        numbers = g.const(np.arange(1, MAX_FIGURES + 1, dtype=np.float32).reshape(1, MAX_FIGURES, 1))
        self.columns = g.flag("Equal", run_number, numbers)  # [N,S,R] one-hot runs

    def first(self, on: str) -> str:
        g = self.g
        return g.reduce("ReduceMin", g.add(self.idx, g.mul(g.sub(1.0, on), self.BIG)), [2])

    def last_end(self, on: str) -> str:
        """One past the last index where `on` is 1."""
        g = self.g
        return g.add(g.reduce("ReduceMax", g.sub(g.mul(self.idx, on), g.mul(g.sub(1.0, on), self.BIG)), [2]), 1.0)

    def row_profile(self, mask: str, columns: str) -> str:
        """[N,S,R]: per figure, how many `mask` pixels each row has inside `columns`."""
        g = self.g
        return g.transpose(g.op("MatMul", mask, g.transpose(columns, [0, 2, 1])), [0, 2, 1])

    def column_profile(self, mask: str, rows: str) -> str:
        """[N,S,R]: per figure, how many `mask` pixels each column has inside `rows`."""
        return self.g.op("MatMul", rows, mask)

    def span(self, start: str, end: str) -> str:
        """[N,S,R] 0/1 selection of indices start <= i < end (start/end [N,S])."""
        g = self.g
        start3 = g.op("Unsqueeze", start, g.ints([2]))
        end3 = g.op("Unsqueeze", end, g.ints([2]))
        return g.mul(g.flag("GreaterOrEqual", self.idx, start3), g.flag("Less", self.idx, end3))

    def extent(self, mask: str, columns: str, rows: str | None, min_row_share: float = 0.0) -> dict[str, str]:
        """Bounding box of `mask` inside the selected columns and rows of each figure.

        Rows with fewer pixels than `min_row_share` of the fullest row are ignored.
        Returns x0, y0, x1, y1 (clipped to the picture; 0 when nothing is found) and
        `found` (0/1), each [N,S].
        """
        g = self.g
        profile = self.row_profile(mask, columns)
        if rows is not None:
            profile = g.mul(profile, rows)
        cut = g.max(g.mul(g.reduce("ReduceMax", profile, [2], 1), min_row_share), 0.5)
        rows_on = g.flag("GreaterOrEqual", profile, cut)
        columns_on = g.flag("GreaterOrEqual", g.mul(self.column_profile(mask, rows_on), columns), 0.5)
        found = g.reduce("ReduceMax", rows_on, [2])
        box = {
            "x0": self.first(columns_on),
            "y0": self.first(rows_on),
            "x1": self.last_end(columns_on),
            "y1": self.last_end(rows_on),
        }
        box = {key: g.mul(g.clip(value, 0.0, float(self.size)), found) for key, value in box.items()}
        return {**box, "found": found}

    def head_end(self, garments: str, person: dict[str, str]) -> str:
        """[N,S]: the first row of each figure that is mostly garment (30% of its width):
        the head is above it, the body below."""
        g = self.g
        width = g.sub(person["x1"], person["x0"])
        garment_rows = self.row_profile(garments, self.columns)
        mostly_garment = g.flag("GreaterOrEqual", garment_rows, g.op("Unsqueeze", g.mul(width, 0.3), g.ints([2])))
        return g.min(self.first(mostly_garment), person["y1"])

    def count_inside(self, mask: str, box: dict[str, str]) -> str:
        """[N,S]: `mask` pixels inside each box."""
        g = self.g
        rows = self.span(box["y0"], box["y1"])
        columns = self.span(box["x0"], box["x1"])
        return g.reduce("ReduceSum", g.mul(self.column_profile(mask, rows), columns), [2])


def _box_size(g: _Graph, box: dict[str, str]) -> tuple[str, str, str]:
    width = g.sub(box["x1"], box["x0"])
    height = g.sub(box["y1"], box["y0"])
    return width, height, g.mul(width, height)


def _confidence(g: _Graph, found: str, evidences: Sequence[str]) -> str:
    """0.97 * sigmoid(8 (e - 1)) with e the weakest evidence ratio (1 = just enough)."""
    weakest = evidences[0] if len(evidences) == 1 else g.min(*evidences)
    return g.mul(g.mul(g.sigmoid(g.mul(g.sub(weakest, 1.0), 8.0)), 0.97), found)


# ------------------------------------------------------------------------ tagger
def _tagger_tags() -> list[tuple[str, int]]:
    general = list(COLOUR_TAGS) + list(GARMENT_NOUNS)
    general += [
        "long_hair", "short_hair", "1girl", "1boy", "solo", "portrait", "upper_body", "full_body",
        "monochrome", "greyscale", "white_background", "blue_background", "simple_background",
    ]  # fmt: skip
    characters = [c.booru_tag for c in TAGGER_CHARACTERS]
    return [(t, 9) for t in RATING_TAGS] + [(t, 0) for t in general] + [(t, 4) for t in characters]


def _selected_tags_csv() -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["tag_id", "name", "category", "count"])
    for tag_id, (name, category) in enumerate(_tagger_tags()):
        writer.writerow([tag_id, name, category, 0])  # no training corpus: no counts
    return buffer.getvalue().encode("utf-8")


def _figure_mask(g: _Graph, background: str) -> str:
    """[N,1,H,W] eroded foreground from a background-colour mask (backgrounds + letterbox grey)."""
    return _erode(g, g.sub(1.0, background))


def _tagger_model() -> bytes:
    g = _Graph()
    size = TAGGER_SIZE
    rgb = g.gather(g.transpose("input", [0, 3, 1, 2]), [2, 1, 0], axis=1)  # BGR NHWC -> RGB NCHW
    colours = _ColourAnalysis(g, rgb, size)
    monochrome = _monochrome_probability(g, rgb)
    # Colour tags need colour: a greyscale picture's greys would pass for silver hair.
    presence = g.mul(colours.presence, g.sub(1.0, monochrome))
    index = {tag: i for i, tag in enumerate(COLOUR_TAGS)}
    scores: dict[str, str] = {tag: _channels(g, presence, i) for i, tag in enumerate(COLOUR_TAGS)}
    for noun, garments in GARMENT_NOUNS.items():
        scores[noun] = _columns(g, presence, [index[t] for t in garments])

    # Figures (column runs of the eroded foreground) and, per figure, where the head ends.
    figure_mask = _erode(g, g.reduce("ReduceMin", colours.background_outside, [1], keepdims=1))
    figures = _Figures(g, figure_mask, size)
    person, person_score = _person_boxes(g, figures)
    # People are counted as the person detector finds them.
    is_figure = g.flag("Greater", person_score, 0.5)
    count = g.reduce("ReduceSum", is_figure, [1], keepdims=1)
    scores["solo"] = g.mul(g.sigmoid(g.mul(g.sub(1.5, count), 6.0)), g.sigmoid(g.mul(g.sub(count, 0.5), 6.0)))

    def group_mask(group: str) -> str:
        members = [i for i, tag in enumerate(COLOUR_TAGS) if TAG_GROUP_OF[tag] == group]
        outside = _channels(g, colours.tag_outside, members[0], members[-1] + 1)
        return g.op("Squeeze", _erode(g, g.sub(1.0, g.reduce("ReduceMin", outside, [1], keepdims=1))), g.ints([1]))

    # Long hair falls below the head (locks over the shoulders); short hair ends above.
    head_end = figures.head_end(group_mask("garments"), person)
    hair_rows = figures.row_profile(group_mask("hair"), figures.columns)
    hair_below = g.reduce("ReduceSum", g.mul(hair_rows, figures.span(head_end, person["y1"])), [2])
    hair_above = g.reduce("ReduceSum", g.mul(hair_rows, figures.span(person["y0"], head_end)), [2])
    below_share = g.div(g.add(hair_below, 1.0), g.add(hair_above, 1.0))
    long_hair = g.sigmoid(g.mul(g.sub(g.log(below_share), float(np.log(LONG_HAIR_BELOW_SHARE))), 4.0))
    has_hair = g.mul(is_figure, g.flag("Greater", hair_above, 0.0))
    colour = g.sub(1.0, monochrome)  # hair is found by its colour
    scores["long_hair"] = g.mul(g.reduce("ReduceMax", g.mul(long_hair, has_hair), [1], keepdims=1), colour)
    scores["short_hair"] = g.mul(g.reduce("ReduceMax", g.mul(g.sub(1.0, long_hair), has_hair), [1], keepdims=1), colour)

    # Framing, as the tallest figure shows it: the share of its height that is head.
    height = g.mul(g.sub(person["y1"], person["y0"]), is_figure)
    tallest = g.flag("Equal", height, g.max(g.reduce("ReduceMax", height, [1], keepdims=1), 1.0))
    head_share = g.div(g.sub(head_end, person["y0"]), g.max(height, 1.0))
    share = g.reduce("ReduceMax", g.mul(head_share, tallest), [1], keepdims=1)
    framed = g.flag("Greater", share, 0.0)  # no figure, no framing
    scores["portrait"] = g.mul(g.sigmoid(g.mul(g.sub(share, PORTRAIT_HEAD_SHARE), 30.0)), framed)
    scores["full_body"] = g.mul(g.sigmoid(g.mul(g.sub(FULL_BODY_HEAD_SHARE, share), 30.0)), framed)
    scores["upper_body"] = g.mul(g.min(g.sub(1.0, scores["portrait"]), g.sub(1.0, scores["full_body"])), framed)

    girl = g.max(*[scores[noun] for noun in GIRL_GARMENTS])
    boy = g.max(*[scores[noun] for noun in BOY_GARMENTS])
    scores["1girl"] = g.min(scores["solo"], girl, g.sub(1.0, boy))
    scores["1boy"] = g.min(scores["solo"], boy)

    scores["greyscale"] = monochrome
    scores["monochrome"] = monochrome
    background_shares = g.sub(1.0, g.reduce("ReduceMean", colours.background_outside, [2, 3]))
    white, blue = _channels(g, background_shares, 0), _channels(g, background_shares, 1)
    blue_seen = g.sigmoid(g.mul(g.sub(blue, 0.1), 40.0))
    scores["blue_background"] = blue_seen
    scores["white_background"] = g.min(g.sigmoid(g.mul(g.sub(white, 0.25), 40.0)), g.sub(1.0, blue_seen))
    scores["simple_background"] = g.sigmoid(g.mul(g.sub(g.add(white, blue), 0.25), 40.0))

    for character in TAGGER_CHARACTERS:
        core = [character.hair, character.eyes, *character.features]
        scores[character.booru_tag] = _columns(g, presence, [index[t] for t in core], "ReduceMin")

    skin_share = g.div(colours.skin, g.add(colours.figure, 1e-6))
    for tag, share in RATING_SKIN_SHARES.items():
        scores[tag] = g.sigmoid(g.mul(g.sub(skin_share, share), 12.0))
    scores["general"] = g.sub(1.0, scores["sensitive"])

    order = [g.clip(scores[name], 0.0, 1.0) for name, _ in _tagger_tags()]
    g.op("Concat", *order, axis=1, out="output")
    return g.model(
        [_float_tensor("input", ["batch", size, size, 3])],
        [_float_tensor("output", ["batch", len(order)])],
        "tiny_wd14_tagger",
    )


# ---------------------------------------------------------------------- identity
def _identity_basis() -> np.ndarray:
    """Orthonormal [T,768] rows of the DCT-II basis: a fixed rotation into 768-d."""
    rows = np.arange(1, len(COLOUR_TAGS) + 1)[:, None]
    columns = np.arange(IDENTITY_DIM)[None, :]
    return (np.sqrt(2.0 / IDENTITY_DIM) * np.cos(np.pi / IDENTITY_DIM * (columns + 0.5) * rows)).astype(np.float32)


def _dominant_colours(g: _Graph, presence: str, fractions: str) -> str:
    """Presence [N,T] with each ONE_COLOUR_GROUPS tag scaled by its share relative to the
    group's largest: a character has one hair and one eye colour, so a stray blob of
    another colour (a generated picture's noise) barely counts, as it would for CCIP."""
    parts, start = [], 0
    for group, tags in TAG_GROUPS.items():
        stop = start + len(tags)
        part = _channels(g, presence, start, stop)
        if group in ONE_COLOUR_GROUPS:
            shares = _channels(g, fractions, start, stop)
            largest = g.reduce("ReduceMax", shares, [1], keepdims=1)
            part = g.mul(part, g.div(shares, g.add(largest, 1e-6)))
        parts.append(part)
        start = stop
    return g.concat(parts, axis=1)


def _identity_feature_model(soft: bool) -> bytes:
    g = _Graph()
    size = IDENTITY_SIZE
    scale = (np.asarray(CLIP_STD, dtype=np.float32) * 255.0).reshape(1, 3, 1, 1)
    shift = (np.asarray(CLIP_MEAN, dtype=np.float32) * 255.0).reshape(1, 3, 1, 1)
    rgb = g.add(g.mul("input", scale), shift)
    colours = _ColourAnalysis(g, rgb, size, soft=soft)
    presence = _dominant_colours(g, colours.presence, colours.fractions)
    weights = np.asarray([IDENTITY_WEIGHTS[TAG_GROUP_OF[t]] for t in COLOUR_TAGS], dtype=np.float32)
    g.op("MatMul", g.mul(presence, weights), g.const(_identity_basis()), out="output")
    return g.model(
        [_float_tensor("input", ["batch", 3, size, size])],
        [_float_tensor("output", ["batch", IDENTITY_DIM])],
        "tiny_ccip_feature",
    )


def _identity_metrics_model() -> bytes:
    g = _Graph()
    norms = g.add(g.op("Sqrt", g.reduce("ReduceSum", g.mul("input", "input"), [1], keepdims=1)), 1e-6)
    unit = g.div("input", norms)
    cosine = g.op("MatMul", unit, g.transpose(unit, [1, 0]))
    g.op("Clip", g.mul(g.sub(1.0, cosine), 0.5), g.const(0.0), g.const(1.0), out="output")
    return g.model(
        [_float_tensor("input", ["batch", IDENTITY_DIM])],
        [_float_tensor("output", ["batch", "batch"])],
        "tiny_ccip_metrics",
    )


# --------------------------------------------------------------------- detectors
# Figure, head and face masks are complements (not background; not background or
# garment; not background, hair, feature or garment), so the blends inside a region
# (around small eyes, say) stay inside it. Skin, hair and garments are eroded colour
# groups. Eyes stay un-eroded: small eyes lose their core to JPEG chroma blur, and a
# face only needs to hold some eye pixels.
DETECTOR_COMPLEMENTS: dict[str, list[tuple[int, int, int]]] = {
    "figure": BACKGROUND_COLOURS,
    "head": [*BACKGROUND_COLOURS, *GARMENT_COLOURS.values()],
    "face": [*BACKGROUND_COLOURS, *HAIR_COLOURS.values(), *FEATURE_COLOURS.values(), *GARMENT_COLOURS.values()],
}
DETECTOR_ERODED: dict[str, list[tuple[int, int, int]]] = {
    "skin": [SKIN],
    "hair": list(HAIR_COLOURS.values()),
    "garments": list(GARMENT_COLOURS.values()),
}
DETECTOR_UNERODED: dict[str, list[tuple[int, int, int]]] = {"eyes": list(EYE_COLOURS.values())}


def _detector_masks(g: _Graph, rgb: str, size: int) -> tuple[str, dict[str, str]]:
    """The eroded figure mask [N,1,R,R] and [N,R,R] masks by name (see above)."""
    layout = [DETECTOR_COMPLEMENTS, DETECTOR_ERODED, DETECTOR_UNERODED]
    groups = _colour_groups(g, rgb, size, [colours for part in layout for colours in part.values()])
    bounds = np.cumsum([0, *map(len, layout)])
    # Eroding the complement of X = 1 - (3x3 max of X).
    grown = g.op("MaxPool", _channels(g, groups, bounds[0], bounds[1]), kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    parts = [g.sub(1.0, grown), _erode(g, _channels(g, groups, bounds[1], bounds[2])),
             _channels(g, groups, bounds[2], bounds[3])]  # fmt: skip
    masks = {
        name: g.op("Squeeze", _channels(g, tensor, i), g.ints([1]))
        for part, tensor in zip(layout, parts, strict=True)
        for i, name in enumerate(part)
    }
    return _channels(g, parts[0], 0), masks


def _person_boxes(g: _Graph, figures: _Figures) -> tuple[dict[str, str], str]:
    box = figures.extent(figures.foreground, figures.columns, None)
    width, height, _ = _box_size(g, box)
    aspect = g.div(height, g.max(width, 1.0))
    # Figures are taller than wide in any framing (the ashtray is half as tall as wide),
    # and at least 6% of the picture tall.
    evidence = [g.div(aspect, 0.8), g.div(height, 0.06 * figures.size)]
    return box, _confidence(g, box["found"], evidence)


def _head_boxes(g: _Graph, figures: _Figures, masks: dict[str, str], person: dict[str, str]):
    rows = figures.span(person["y0"], figures.head_end(masks["garments"], person))
    box = figures.extent(masks["head"], figures.columns, rows)
    _, height, area = _box_size(g, box)
    area = g.max(area, 1.0)
    hair = g.div(figures.count_inside(masks["hair"], box), area)
    skin = g.div(figures.count_inside(masks["skin"], box), area)
    evidence = [g.div(hair, 0.1), g.div(skin, 0.03), g.div(height, 0.015 * figures.size)]
    return box, _confidence(g, g.mul(box["found"], person["found"]), evidence)


def _face_boxes(g: _Graph, figures: _Figures, masks: dict[str, str], head: dict[str, str]):
    columns = g.mul(figures.span(head["x0"], head["x1"]), figures.columns)
    rows = figures.span(head["y0"], head["y1"])
    skin_box = figures.extent(masks["face"], columns, rows, min_row_share=0.45)
    _, height, area = _box_size(g, skin_box)
    area = g.max(area, 1.0)
    eyes = g.div(figures.count_inside(masks["eyes"], skin_box), area)
    skin = g.div(figures.count_inside(masks["skin"], skin_box), area)
    evidence = [g.div(eyes, 0.015), g.div(skin, 0.15), g.div(height, 0.01 * figures.size)]
    # Bangs hide the forehead: the face reaches half the visible skin's height higher.
    top = g.max(g.sub(skin_box["y0"], g.mul(height, 0.5)), head["y0"])
    box = {**skin_box, "y0": g.mul(top, skin_box["found"])}
    return box, _confidence(g, g.mul(box["found"], head["found"]), evidence)


def _halfbody_boxes(g: _Graph, figures: _Figures, person: dict[str, str]):
    width, height, _ = _box_size(g, person)
    aspect = g.div(height, g.max(width, 1.0))
    # A full figure (aspect >= 2) is cut at the hips; a shorter one already is a half body.
    full_figure = g.flag("GreaterOrEqual", aspect, 2.0)
    cut = g.add(person["y0"], g.mul(height, g.sub(1.0, g.mul(full_figure, 0.425))))
    box = figures.extent(figures.foreground, figures.columns, figures.span(person["y0"], cut))
    # Heads and busts (aspect < 1.2) hold no half body.
    evidence = [g.div(aspect, 1.2), g.div(height, 0.06 * figures.size)]
    return box, _confidence(g, g.mul(box["found"], person["found"]), evidence)


def _detector_model(label: str) -> bytes:
    g = _Graph()
    size = DETECTOR_SIZE
    rgb = g.mul(_subsample(g, "images", size), 255.0)
    figure, masks = _detector_masks(g, rgb, size // 2)
    figures = _Figures(g, figure, size // 2)
    person, person_score = _person_boxes(g, figures)
    if label == "person":
        box, score = person, person_score
    elif label == "halfbody":
        box, score = _halfbody_boxes(g, figures, person)
    else:
        head, head_score = _head_boxes(g, figures, masks, person)
        box, score = (head, head_score) if label == "head" else _face_boxes(g, figures, masks, head)
    # Working pixels are every second letterbox pixel: centres are x0 + x1, sizes doubled.
    centre_x = g.add(box["x0"], box["x1"])
    centre_y = g.add(box["y0"], box["y1"])
    width = g.mul(g.sub(box["x1"], box["x0"]), 2.0)
    height = g.mul(g.sub(box["y1"], box["y0"]), 2.0)
    rows = [g.op("Unsqueeze", value, g.ints([1])) for value in (centre_x, centre_y, width, height, score)]
    per_figure = g.concat(rows, axis=1)  # [N,5,S]
    g.op("Pad", per_figure, g.ints([0, 0, 0, 0, 0, DETECTOR_ANCHORS - MAX_FIGURES]), out="output0")
    metadata = {
        "description": f"tiny fixed-weight {label} detector for the lora_factory demo world",
        "author": "lora_factory",
        "version": "tiny-1",
        "license": "same as lora_factory",
        "stride": "32",
        "task": "detect",
        "batch": "1",
        "imgsz": f"[{size}, {size}]",
        "names": repr({0: label}),
    }
    return g.model(
        [_float_tensor("images", ["batch", 3, size, size])],
        [_float_tensor("output0", ["batch", 5, DETECTOR_ANCHORS])],
        f"tiny_{label}_detector",
        metadata,
    )


# -------------------------------------------------------------------- classifiers
def _monochrome_probability(g: _Graph, rgb: str) -> str:
    """[N,1]: high when (almost) no pixel is chromatic (greyscale pictures)."""
    spread = g.sub(g.reduce("ReduceMax", rgb, [1], 1), g.reduce("ReduceMin", rgb, [1], 1))
    chromatic = g.reduce("ReduceMean", g.flag("Greater", spread, 40.0), [2, 3])
    return g.sigmoid(g.mul(g.log(g.div(0.004, g.add(chromatic, 1e-5))), 2.0))


def _flatness(g: _Graph, rgb: str, size: int) -> str:
    """[N,1]: share of figure (non-background) pixels that are a tag colour or skin."""
    masks = _colour_groups(g, rgb, size, [[*TAG_RGB.values(), SKIN], BACKGROUND_COLOURS])
    shares = g.reduce("ReduceMean", masks, [2, 3])
    return g.div(_channels(g, shares, 0), g.add(g.sub(1.0, _channels(g, shares, 1)), 1e-3))


def _classifier_model(name: str) -> bytes:
    labels = CLASSIFIER_LABELS[name]
    g = _Graph()
    size = CLASSIFIER_SIZE // 2
    rgb = g.add(g.mul(_subsample(g, "input", CLASSIFIER_SIZE), 127.5), 127.5)  # undo (x - 0.5) / 0.5
    if name == "tiny-monochrome":
        mono = _monochrome_probability(g, rgb)
        g.op("Concat", mono, g.sub(1.0, mono), axis=1, out="output")
    else:
        if name == "tiny-classification":
            mono = _monochrome_probability(g, rgb)
            flat = _flatness(g, rgb, size)
            colour = g.sub(1.0, mono)
            logits = {
                "3d": g.mul(g.mul(g.sub(1.0, flat), colour), 6.0),
                "bangumi": g.add(g.mul(mono, 0.0), 1.0),
                "comic": g.mul(mono, 6.0),
                "illustration": g.mul(g.mul(flat, colour), 6.0),
            }
        elif name == "tiny-rating":
            masks = _colour_groups(g, rgb, size, [[SKIN], BACKGROUND_COLOURS])
            skin = g.reduce("ReduceMean", _erode(g, _channels(g, masks, 0)), [2, 3])
            figure = g.reduce("ReduceMean", _figure_mask(g, _channels(g, masks, 1)), [2, 3])
            share = g.div(skin, g.add(figure, 1e-6))
            logits = {
                "safe": g.mul(share, 0.0),
                "r15": g.mul(g.sub(share, RATING_SKIN_SHARES["sensitive"]), 12.0),
                "r18": g.mul(g.sub(share, RATING_SKIN_SHARES["explicit"]), 12.0),
            }
        else:
            flat = _flatness(g, rgb, size)
            logits = {
                label: g.mul(g.mul(g.sub(flat, centre), g.sub(flat, centre)), -1.0 / AESTHETIC_WIDTH**2)
                for label, centre in AESTHETIC_FLATNESS.items()
            }
        g.op("Softmax", g.concat([logits[label] for label in labels], axis=1), axis=1, out="output")
    return g.model(
        [_float_tensor("input", ["batch", 3, CLASSIFIER_SIZE, CLASSIFIER_SIZE])],
        [_float_tensor("output", ["batch", len(labels)])],
        name.replace("-", "_"),
    )


def _meta_json(labels: Sequence[str]) -> bytes:
    return (json.dumps({"labels": list(labels)}, indent=2) + "\n").encode("utf-8")


# ---------------------------------------------------------------------- building
TINY_MODEL_FILES: dict[str, tuple[str, ...]] = {
    "tiny-tagger": ("model.onnx", "selected_tags.csv"),
    "tiny-identity": ("model_feat.onnx", "model_metrics.onnx", "metrics.json"),
    **{name: ("model.onnx",) for name in DETECTOR_LABELS},
    **{name: ("model.onnx", "meta.json") for name in CLASSIFIER_LABELS},
}
TINY_MODEL_NAMES: tuple[str, ...] = tuple(TINY_MODEL_FILES)


def identity_model_files(soft: bool = True) -> dict[str, bytes]:
    """The tiny identity model's files; `soft=False` reads colours within COLOUR_RADIUS
    only, as the tagger does (kept to measure what the soft reading gains)."""
    metrics = {"threshold": IDENTITY_THRESHOLD, "description": "same character when difference <= threshold"}
    return {
        "model_feat.onnx": _identity_feature_model(soft),
        "model_metrics.onnx": _identity_metrics_model(),
        "metrics.json": (json.dumps(metrics, indent=2) + "\n").encode("utf-8"),
    }


def tiny_model_files(name: str) -> dict[str, bytes]:
    """File name -> bytes of the tiny model `name` (deterministic), as TINY_MODEL_FILES lists."""
    if name == "tiny-tagger":
        return {"model.onnx": _tagger_model(), "selected_tags.csv": _selected_tags_csv()}
    if name == "tiny-identity":
        return identity_model_files(soft=True)
    if name in DETECTOR_LABELS:
        return {"model.onnx": _detector_model(DETECTOR_LABELS[name])}
    if name in CLASSIFIER_LABELS:
        return {"model.onnx": _classifier_model(name), "meta.json": _meta_json(CLASSIFIER_LABELS[name])}
    raise KeyError(f"unknown tiny model {name!r}; tiny models are {list(TINY_MODEL_NAMES)}")


def build_tiny_model(name: str, target_dir: Path) -> Path:
    """Write tiny model `name` into `target_dir` (files rewritten only when they differ)."""
    target_dir = Path(target_dir)
    for file_name, data in tiny_model_files(name).items():
        path = target_dir / file_name
        if not path.is_file() or path.read_bytes() != data:
            atomic_write_bytes(path, data)
    return target_dir


def build_tiny_models(target_dir: Path) -> dict[str, Path]:
    """Build every tiny model into `target_dir/<name>/`; returns name -> folder."""
    return {name: build_tiny_model(name, Path(target_dir) / name) for name in TINY_MODEL_NAMES}


# ---------------------------------------------------------------------- registry
# The tiny model of each VisionModels role, and their registry specs: built on resolve,
# with the real detectors' confidence thresholds.
TINY_MODELS: dict[str, str] = {role: f"tiny-{role}" for role in DEFAULT_MODELS}
_DETECTOR_THRESHOLDS = {"tiny-person": 0.3, "tiny-head": 0.4, "tiny-face": 0.25, "tiny-halfbody": 0.5}
TINY_SPECS: tuple[ModelSpec, ...] = tuple(
    ModelSpec(
        name,
        None,
        files,
        kind={"tiny-tagger": "tagger", "tiny-identity": "identity"}.get(
            name, "detector" if name in DETECTOR_LABELS else "classifier"
        ),
        # The tiny detectors read figures' proportions, which imgutils' straight resize to
        # 640x640 distorts: they take ultralytics' letterbox (aspect kept).
        defaults={"conf_threshold": _DETECTOR_THRESHOLDS[name], "resize": "letterbox"} if name in DETECTOR_LABELS
        else {},
        build=functools.partial(build_tiny_model, name),
    )
    for name, files in TINY_MODEL_FILES.items()
)


def tiny_registry(models_dir: Path, **options) -> ModelRegistry:
    """A registry that knows the real models and builds the tiny ones (`ModelRegistry`'s options)."""
    return ModelRegistry(models_dir, specs=(*BUILTIN_SPECS, *TINY_SPECS), **options)
