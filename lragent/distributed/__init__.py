"""Running one engine over several devices: tensor parallelism as a transformation of the model (`tensor_parallel`)."""
