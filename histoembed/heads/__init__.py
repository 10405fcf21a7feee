"""The classification heads of the fit stage and the maths that calibrates and fuses them.

- ``mlp``: a small torch MLP on crop-view embeddings (image logits: mean over crop-views).
- ``xgb``: XGBoost on per-view image means, with a PCA fitted inside the fold.
- ``calibration``: one temperature per head, chosen by NLL.
- ``fusion``: the weight mixing the two heads' scaled logits, chosen by macro-F1.
"""
