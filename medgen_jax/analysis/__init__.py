"""Studies of the data rather than of a model (site_effects: how identifiable each scanner is)."""
