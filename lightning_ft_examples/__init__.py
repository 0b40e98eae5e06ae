"""Examples built on lightning-ft, kept out of the library: data preparation for the recipes in ``recipes/``.

``lightning_ft_examples.mr`` writes the MR movie-review data the MR recipes train on (``lightning-ft prepare-mr``).
"""
