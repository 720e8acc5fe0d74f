"""The data engine: problems, teacher generation, verification and filtering."""
