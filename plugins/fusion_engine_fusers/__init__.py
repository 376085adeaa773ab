"""fusion-engine first-party plugin: fusers."""
