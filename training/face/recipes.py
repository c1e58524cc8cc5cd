"""Training recipes: which losses, with which weights (see training/face/train.py for the losses).

Kept apart from the training code so the command line can list them without importing TensorFlow.
"""

RECIPES: dict[str, dict[str, float]] = {
    "triplet": {"triplet": 1.0},
    "cosface": {"cosface": 1.0},
    "distill": {"distill": 1.0},
    "simmatch": {"simmatch": 1.0},
    "distill+triplet": {"distill": 1.0, "triplet": 1.0},
    "distill+cosface": {"distill": 1.0, "cosface": 0.1},
    "distill+simmatch+triplet": {"distill": 1.0, "simmatch": 1.0, "triplet": 1.0},
}
TEACHER_LOSSES = {"distill", "simmatch"}  # recipes with these need the teacher's cached embeddings
