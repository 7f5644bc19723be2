"""core: the vocabulary every stage speaks (errors, arches and targets, recipes, settings, files)."""
