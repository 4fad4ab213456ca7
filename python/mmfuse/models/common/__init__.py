"""Building blocks shared by model families."""
