"""fusion-engine first-party plugin: metrics."""
