"""Training: recipes, data, the trainer and the synthetic video world (``train.world``)."""
