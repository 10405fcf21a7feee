"""Tools that are not stages of a run: the demo (every stage on generated data), synthetic datasets and slides,
and the paired comparison of two runs."""
