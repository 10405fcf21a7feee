"""QuPath GeoJSON out: the tissue found (annotations, with holes) and the patches (detections, with their
measurements), so that a pathologist opening the slide in QuPath sees where the model looked.

A FeatureCollection of polygons in level-0 pixels; each feature's ``properties`` hold ``objectType``,
``classification`` ``{"name", "color": [r, g, b]}`` and ``measurements`` (name -> number, what QuPath lists per
object). Every polygon written is checked valid by shapely first.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import shapely
from shapely import affinity
from shapely.geometry import LineString, Point, Polygon, box, mapping, shape
from shapely.geometry.polygon import orient

from histoembed.core.store import atomic_path
from histoembed.inputs.exchange.geojson import polygons_of

TISSUE_CLASS = ("Tissue", (0, 150, 0))
PATCH_CLASS = ("Patch", (30, 90, 200))
PRECISION = 0.01        # level-0 pixels: coordinates written to two decimals


def _ring_area(contour: np.ndarray):
    """The area a contour of pixel indices encloses (a point or a line for one or two pixels), made valid."""
    pts = contour.reshape(-1, 2).astype(np.float64)
    if len(pts) == 1:
        return Point(pts[0])
    if len(pts) == 2:
        return LineString(pts)
    return shapely.make_valid(Polygon(pts))


def _region(contour: np.ndarray, holes: list[np.ndarray]):
    """A region's pixels (in pixel units, a pixel's centre at index + 0.5) from OpenCV's contours: both its outline
    and its holes' outlines run through the centres of the region's border pixels, so the outline grows half a
    pixel and each hole shrinks half a pixel onto the pixels' edges (mitred: square corners stay square)."""
    g = _ring_area(contour).buffer(0.5, cap_style="square", join_style="mitre")
    cut = [_ring_area(h).buffer(-0.5, join_style="mitre") for h in holes]
    if cut:
        g = g.difference(shapely.union_all(cut))
    return affinity.translate(g, 0.5, 0.5)


def mask_polygons(mask: np.ndarray, slide_size: tuple[int, int]) -> list[Polygon]:
    """The regions of a boolean mask (a thumbnail of the slide, any size) as level-0 polygons with their holes.

    OpenCV's two-level contours give each region's outline and its holes; ``_region`` puts them on the pixels'
    edges, so a region's polygon covers exactly its pixels. Then scaled to level 0, clipped to the slide and
    rounded to ``PRECISION``.
    """
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    links = hierarchy[0]  # per contour: next, previous, first child, parent
    w0, h0 = slide_size
    sx, sy = w0 / mask.shape[1], h0 / mask.shape[0]
    slide = box(0, 0, w0, h0)
    out: list[Polygon] = []
    for i, contour in enumerate(contours):
        if links[i][3] != -1:
            continue  # a hole: taken with its region
        holes, j = [], links[i][2]
        while j != -1:
            holes.append(contours[j])
            j = links[j][0]
        g = affinity.scale(_region(contour, holes), sx, sy, origin=(0, 0)).intersection(slide)
        g = shapely.set_precision(g, PRECISION)
        out += [orient(p) for p in polygons_of(g) if p.area > 0]
    return out


def _colour(rgb: Sequence[int]) -> list[int]:
    return [int(c) for c in rgb]


def qupath_feature(polygon: Polygon, object_type: str, name: str, color: Sequence[int],
                   measurements: Mapping[str, float] | None = None, key: str = "") -> dict:
    """One QuPath object: its polygon, type, class and measurements (non-finite ones left out: JSON has no NaN).
    ``key`` makes its id (a UUID, as QuPath's) the same on every export of the same object."""
    props: dict = {"objectType": object_type, "classification": {"name": name, "color": _colour(color)}}
    if object_type == "annotation":
        props["isLocked"] = False
    kept = {k: float(v) for k, v in (measurements or {}).items() if v is not None and math.isfinite(float(v))}
    if kept:
        props["measurements"] = kept
    fid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"histoembed/{object_type}/{key}")) if key else str(uuid.uuid4())
    return {"type": "Feature", "id": fid, "geometry": mapping(polygon), "properties": props}


def tissue_annotations(mask: np.ndarray, slide_size: tuple[int, int], slide: str = "",
                       name: str = TISSUE_CLASS[0], color: Sequence[int] = TISSUE_CLASS[1]) -> list[dict]:
    """The tissue of a thumbnail mask as QuPath annotations (one per region, holes kept)."""
    return [qupath_feature(p, "annotation", name, color, {"Area px^2": p.area}, f"{slide}/tissue/{i}")
            for i, p in enumerate(mask_polygons(mask, slide_size))]


def patch_detections(boxes: np.ndarray, measurements: Mapping[str, Sequence[float]] | None = None,
                     classes: Sequence[str] | None = None, colors: Mapping[str, Sequence[int]] | None = None,
                     slide: str = "") -> list[dict]:
    """Patches (N, 4 level-0 boxes) as QuPath detections, each with its row of ``measurements``
    (name -> N values) and, when given, its class (e.g. the predicted one) coloured by ``colors``."""
    boxes = np.asarray(boxes)
    measurements = {k: np.asarray(v, np.float64) for k, v in (measurements or {}).items()}
    bad = [k for k, v in measurements.items() if v.shape != (len(boxes),)]
    if bad:
        raise ValueError(f"measurement(s) {bad} do not have one value per patch ({len(boxes)})")
    colors = colors or {}
    out = []
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        name = classes[i] if classes is not None else PATCH_CLASS[0]
        out.append(qupath_feature(orient(box(x0, y0, x1, y1)), "detection", name,
                                  colors.get(name, PATCH_CLASS[1]), {k: v[i] for k, v in measurements.items()},
                                  f"{slide}/patch/{x0},{y0},{x1},{y1}"))
    return out


def write_geojson(path: str | Path, features: Sequence[dict], extra: Mapping | None = None) -> Path:
    """A FeatureCollection QuPath opens, written atomically; every polygon is checked valid first. ``extra``:
    foreign members of the collection (GeoJSON allows them; QuPath reads ``features`` alone)."""
    path = Path(path)
    for i, feature in enumerate(features):
        g = shape(feature["geometry"])
        if not polygons_of(g) or not g.is_valid:
            raise ValueError(f"feature {i} of {path.name} is not a valid polygon: {shapely.is_valid_reason(g)}")
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"type": "FeatureCollection", **dict(extra or {}),
                                   "features": list(features)}, allow_nan=False))
    return path
