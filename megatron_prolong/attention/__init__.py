"""Core-attention backends: the portable torch one (document masks, context parallelism) and TE."""
