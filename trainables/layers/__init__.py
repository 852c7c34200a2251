"""Building blocks the model families share (attention, ViT bodies, patch fitting, pair bias, window grids); no family
is registered here."""
