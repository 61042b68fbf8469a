"""Training, evaluation and Hub I/O: datasets, uptraining, evaluation, save / load, config validation."""
