"""Meta-test harness: seeded episodes, fine-tuning, confidence intervals."""
