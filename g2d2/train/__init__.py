"""Training of the embedded tiny priors (models, loop, stages, training images); not used by the runner."""
