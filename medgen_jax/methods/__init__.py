"""Methods: each file holds its loss and its train step, built from shared parts."""
