"""Model zoos: recipes -> pre-trained teachers + manifest."""
