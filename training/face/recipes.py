"""Training recipes: which losses, with which weights (see training/face/train.py for the losses).

Kept apart from the training code so the command line can list them without importing TensorFlow.
"""

from pathlib import Path


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

# The student cut out of dlib's network (slim.py), here so the command line needs no Keras to show its defaults:
# residual-stream width per level (dlib: 32, 64, 128, 256, 256; each block's inner width is its level's), giving
# 0.93 M parameters and 87 M MACs at a 112 px chip, against dlib's 5.6 M and 0.27 G at 150 px.
SLIM_WIDTHS = (32, 48, 64, 80, 96)
SLIM_SIZE = 112
SLIM_CACHE = Path("build/face-slim/teacher")
