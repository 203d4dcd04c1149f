"""Record types and Parquet layouts of icl-cluster-pipeline.

This package imports nothing else of the project: downstream trainers may depend on it alone.
"""

from schemas.parquet import CLUSTERS_SCHEMA, REJECTS_SCHEMA, SCHEMA_VERSION
from schemas.records import (
    BoilerplateHit,
    Cluster,
    ClusterProvenance,
    ClusterStats,
    ImageRecord,
    InputRecord,
    PageGroup,
    Prompt,
    Reject,
)

__all__ = [
    "CLUSTERS_SCHEMA",
    "REJECTS_SCHEMA",
    "SCHEMA_VERSION",
    "BoilerplateHit",
    "Cluster",
    "ClusterProvenance",
    "ClusterStats",
    "ImageRecord",
    "InputRecord",
    "PageGroup",
    "Prompt",
    "Reject",
]
