"""Captions to candidate tags: the spaCy model (`nlp`) and the parser with its policies (`tags`)."""
