"""stage2_prior package (being written)."""
