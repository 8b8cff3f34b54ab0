"""From run records to summary.csv and paper-style tables."""
