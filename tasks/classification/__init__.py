"""ImageNet classification with CARAFE++ in the ResNet backbone (CARAFE++ Tables II and XII)."""
