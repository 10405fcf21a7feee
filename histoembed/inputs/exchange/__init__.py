"""Features and annotations in the field's formats, in and out (issue 30).

* ``record``: what one feature file holds once read (``FeatureFile``), how a slide was patched (``Patching``),
  and the checks every reader shares;
* ``trident``: TRIDENT's HDF5 feature files (and CLAM's older ones), written and read;
* ``stamp``: STAMP's HDF5 feature files (coordinates in micrometres), written and read;
* ``folder``: any of those files or a folder of them, recognised by content and checked for one encoder,
  one dimension and one patch size;
* ``geojson``: QuPath GeoJSON annotation masks in (what ``inputs/dataset.py`` reads for a slide's mask);
* ``geojson_out``: QuPath GeoJSON out: tissue as annotations (with holes), patches as detections;
* ``rows``: a read feature file as the slide rows of ``crops.parquet``.

The submodules are imported one by one (h5py for the feature files, shapely for GeoJSON), so reading a GeoJSON
mask never loads h5py and the reverse; ``geojson`` imports only ``core.errors``, keeping ``inputs/dataset.py``'s
import chain as short as it was.
"""
