"""moekit's transformers classes, their registration with the Auto classes, and loading."""
