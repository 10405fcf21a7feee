"""The pipeline's stages, one module per verb, in the order a run goes through them.

Each stage reads only the files of the stages before it (``run/``) and writes its own; a stage never imports
another stage: what two of them share lives below, in ``inputs/`` (the data a run was cut from, the crop
recipe) or ``models/`` (heads, calibrated probabilities, the fold ensemble, maps).
"""

PIPELINE = ("qc", "crops", "embed", "fit", "submit", "report", "predict", "drift")
