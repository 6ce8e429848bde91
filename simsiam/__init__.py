"""SimSiam (Chen & He 2021): a siamese encoder with a predictor and stop-gradient, no target network, no negatives."""
from simsiam.module import SimSiam, negative_cosine, prediction_mlp, projection_mlp, simsiam_loss

__all__ = ["SimSiam", "negative_cosine", "prediction_mlp", "projection_mlp", "simsiam_loss"]
