"""Models: frozen encoders (``encoders``, the registry ``zoo``, the ``precision`` check), the heads trained on
their features (``heads``, one registry) and the fold ensemble that ``submit``, ``predict`` and ``report`` load
(``inference``, kept apart from training in ``histoembed.stages.fit``), and the per-crop maps it gives the
report (``maps``: attention over a bag or per-crop scores, from the heads that declare them).

Imports only ``core``, ``inputs`` and ``maths``.
"""
