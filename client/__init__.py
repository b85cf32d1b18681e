"""The Flower ClientApp: device profile, mixed local + synthetic data, training, quantized upload."""
