"""fusion-engine first-party plugin: timm."""
