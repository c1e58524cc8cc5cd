"""Host-side training: Keras models for digits (MNIST), meter digits and face embeddings."""
