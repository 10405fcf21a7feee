"""Models: frozen encoders (``encoders``, the registry ``zoo``, the ``precision`` check), the heads trained on
their features (``heads``, one registry) and the fold ensemble that ``submit``, ``predict`` and ``report`` load
(``inference``, kept apart from training in ``histoembed.stages.fit``).

Imports only ``core``, ``inputs`` and ``maths``.
"""
