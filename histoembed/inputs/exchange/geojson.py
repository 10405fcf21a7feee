"""QuPath GeoJSON masks in: the regions a pathologist drew, so that patches come only from inside them.

QuPath writes a FeatureCollection (or a bare array of features) of polygons in level-0 pixels, the origin at the
slide's top-left corner. Each feature's ``properties`` hold ``objectType`` ("annotation" for drawn regions,
"detection", "cell" or "tile" for machine-made objects) and ``classification`` ``{"name", "color"}``. A mask
takes the annotations' polygons (of some classes, when asked), holes excluded; polygons that are not valid (a
self-crossing outline) are repaired by shapely's ``make_valid`` rather than refused. Writing QuPath objects is
``geojson_out``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import shapely
from shapely import affinity
from shapely.geometry import GeometryCollection, MultiPolygon, Polygon, box, shape

from histoembed.core.errors import UserError

DRAWN = {"annotation"}  # objectTypes a mask takes (detections, cells and tiles are machine-made)
INSET = 0.5 - 1 / 64    # pixels a ring shrinks before OpenCV fills it (see ``_filled``): half a pixel, less a
                        # sliver so that a region one pixel wide keeps its pixels


def polygons_of(g) -> list[Polygon]:
    """The polygons of any shapely geometry (a line or point has none)."""
    if isinstance(g, Polygon):
        return [] if g.is_empty else [g]
    if isinstance(g, (MultiPolygon, GeometryCollection)):
        return [p for part in g.geoms for p in polygons_of(part)]
    return []



def _features_of(doc, path: Path) -> list:
    """The features of a FeatureCollection, a bare array of features (QuPath's default export), one feature,
    or one geometry."""
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict):
        kind = doc.get("type")
        if kind == "FeatureCollection" and isinstance(doc.get("features"), list):
            return doc["features"]
        if kind == "Feature":
            return [doc]
        if kind in ("Polygon", "MultiPolygon", "GeometryCollection"):
            return [{"type": "Feature", "geometry": doc, "properties": {}}]
    raise UserError("not a GeoJSON FeatureCollection, feature or array of features", path=path,
                    hint="export the annotations from QuPath with File > Export objects as GeoJSON")


def class_names(props: dict) -> list[str]:
    """A QuPath object's class names: ``classification.name`` (split at ': ' for derived classes such as
    'Tumor: Positive'), or ``classification.names``; none when unclassified."""
    c = props.get("classification") if isinstance(props, dict) else None
    if not isinstance(c, dict):
        return []
    names = c.get("names") if isinstance(c.get("names"), list) else [c.get("name")]
    out = [str(n) for n in names if n]
    return out + [part for n in out for part in n.split(": ") if part != n]


def _annotation_polygons(feature, i: int, path: Path) -> tuple[list[Polygon], list[str]]:
    """(polygons, class names) of one feature when it is a drawn annotation; ([], names) otherwise."""
    if not isinstance(feature, dict):
        raise UserError(f"feature {i} is not a JSON object", path=path)
    props = feature.get("properties") or {}
    names = class_names(props)
    if str(props.get("objectType", "annotation")) not in DRAWN or not feature.get("geometry"):
        return [], names
    try:
        g = shape(feature["geometry"])
    except (AttributeError, KeyError, TypeError, ValueError, shapely.errors.ShapelyError) as e:
        raise UserError(f"feature {i} has a geometry that cannot be read ({e})", path=path) from None
    if not g.is_valid:
        g = shapely.make_valid(g)
    return [p for p in polygons_of(g) if p.area > 0], names


def read_polygons(path: str | Path, classes: Sequence[str] | None = None) -> list[Polygon]:
    """The polygons (holes kept) of a QuPath GeoJSON's annotations, in level-0 pixels; with ``classes``, only
    those of annotations of one of those classes (case does not matter). Not JSON, not GeoJSON, or no polygon
    left is a UserError naming the file."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise UserError("GeoJSON mask not found", path=path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"not valid JSON ({e})", path=path,
                        hint="export the annotations again from QuPath (File > Export objects as GeoJSON)") from None
    wanted = {c.strip().lower() for c in classes or () if c.strip()}
    polygons, seen = [], set()
    for i, feature in enumerate(_features_of(doc, path)):
        found, names = _annotation_polygons(feature, i, path)
        if not found:
            continue
        seen.update(names or ["(unclassified)"])
        if not wanted or wanted & {n.lower() for n in names}:
            polygons += found
    if not polygons:
        what = f"no polygon annotation of class {', '.join(sorted(classes or []))}" if wanted else \
            "no polygon annotation"
        raise UserError(what, path=path, hint=(f"the file's annotations are of class(es): {', '.join(sorted(seen))}"
                                              if seen else "draw the regions as polygon or area annotations "
                                                           "in QuPath and export them again"))
    return polygons


def check_on_slide(polygons: Sequence[Polygon], slide_size: tuple[int, int], path: str | Path) -> None:
    """Every polygon must overlap the slide (level-0 pixels); one wholly outside is a UserError naming the file."""
    w0, h0 = slide_size
    slide = box(0, 0, w0, h0)
    for i, p in enumerate(polygons):
        if not p.intersects(slide) or p.intersection(slide).area <= 0:
            x0, y0, x1, y1 = (round(v) for v in p.bounds)
            raise UserError(f"polygon {i} ({x0}..{x1} x {y0}..{y1}) lies outside the {w0}x{h0} slide",
                            path=Path(path), hint="the coordinates must be the slide's level-0 pixels, as QuPath "
                                                  "exports them for the slide it was drawn on")


def _filled(ring) -> list[np.ndarray]:
    """What OpenCV fills for a ring (in pixel coordinates, a pixel's centre at integers) so that it takes the
    pixels whose centres lie inside: OpenCV rounds the outline to pixel centres and takes the pixels on it, so
    the ring is first shrunk by (almost) half a pixel; a ring too small for that takes the pixel centres it
    holds one by one. Points in OpenCV's fixed point (4 fractional bits)."""
    area = Polygon(ring)
    parts = polygons_of(area.buffer(-INSET, join_style="mitre"))
    if not parts:
        x0, y0, x1, y1 = area.bounds
        xs, ys = np.meshgrid(np.arange(math.ceil(x0), math.floor(x1) + 1), np.arange(math.ceil(y0), math.floor(y1) + 1))
        inside = shapely.contains_xy(shapely.make_valid(area), xs, ys)
        return [np.array([[x * 16, y * 16]], np.int32) for x, y in zip(xs[inside], ys[inside])]
    return [np.rint(np.asarray(r.exterior.coords)[:, :2] * 16).astype(np.int32) for r in parts]


def rasterise(polygons: Sequence[Polygon], shape_hw: tuple[int, int], slide_size: tuple[int, int]) -> np.ndarray:
    """A boolean mask of ``shape_hw`` (a thumbnail of the slide) true where a pixel's centre lies inside a polygon
    and outside its holes. Each polygon is drawn in its own bounding window, so one polygon's hole never erases
    another polygon (an island drawn inside it)."""
    h, w = shape_hw
    w0, h0 = slide_size
    sx, sy = w / w0, h / h0
    out = np.zeros((h, w), bool)
    for p in polygons:
        minx, miny, maxx, maxy = p.bounds
        x_lo, y_lo = max(0, math.floor(minx * sx) - 1), max(0, math.floor(miny * sy) - 1)
        x_hi, y_hi = min(w, math.ceil(maxx * sx) + 1), min(h, math.ceil(maxy * sy) + 1)
        if x_hi <= x_lo or y_hi <= y_lo:
            continue
        q = affinity.affine_transform(p, [sx, 0, 0, sy, -0.5 - x_lo, -0.5 - y_lo])  # window pixel coordinates
        window = np.zeros((y_hi - y_lo, x_hi - x_lo), np.uint8)
        shell = _filled(q.exterior)
        if shell:
            cv2.fillPoly(window, shell, 1, cv2.LINE_8, shift=4)
        holes = [pts for ring in q.interiors for pts in _filled(ring)]
        if holes:
            cv2.fillPoly(window, holes, 0, cv2.LINE_8, shift=4)
        out[y_lo:y_hi, x_lo:x_hi] |= window.astype(bool)
    return out


def geojson_mask(path: str | Path, slide_size: tuple[int, int], shape_hw: tuple[int, int],
                 classes: Sequence[str] | None = None) -> np.ndarray:
    """A slide's QuPath GeoJSON mask on a thumbnail of ``shape_hw``: its annotations (of ``classes`` when given)
    checked to lie on the slide, holes excluded."""
    polygons = read_polygons(path, classes)
    check_on_slide(polygons, slide_size, path)
    return rasterise(polygons, shape_hw, slide_size)


def is_geojson(path: str | Path | None) -> bool:
    """A mask given as QuPath GeoJSON (by its suffix) rather than an image."""
    return path is not None and Path(path).suffix.lower() in (".geojson", ".json")
