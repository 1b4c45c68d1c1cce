"""Direction estimators (scikit-learn conventions)."""
