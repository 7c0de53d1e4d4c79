"""Package data: the shipped digit-model weights and their training metadata (see attnkit.vision.digits)."""
