"""fusion-engine first-party plugin: datasets."""
