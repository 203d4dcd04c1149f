"""The command line, configuration and assembly of stages into Beam pipelines (one per phase)."""
