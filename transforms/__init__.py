"""The pipeline's stages: one module per stage, each a composite ``PTransform`` over typed records."""
