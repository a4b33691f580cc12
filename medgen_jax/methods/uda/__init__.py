"""Unsupervised domain adaptation: a labelled source, an unlabelled target (data.held_out, with
data.target_adaptation=True), evaluated on the target's test cases. See common.py."""
