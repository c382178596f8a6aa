"""Using a trained model: predict, export and serve; no training code."""
