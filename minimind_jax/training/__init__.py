"""Training: the config, the stages, the one train step and the loop that runs every stage."""
