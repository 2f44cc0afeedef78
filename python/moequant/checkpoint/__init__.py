"""Reading source checkpoints: config flavours, shard index, per-tensor reads, validation."""

from .config import Int4Scheme, SourceConfig, read_config
from .errors import CheckpointError
from .layout import COMPONENTS, Item, Job, Unit, all_items, build_layout
from .source import Source

__all__ = [
    "CheckpointError",
    "Int4Scheme",
    "SourceConfig",
    "read_config",
    "Source",
    "Item",
    "Job",
    "Unit",
    "COMPONENTS",
    "all_items",
    "build_layout",
]
