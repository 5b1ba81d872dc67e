"""Moved to ``tinyraftplus.raft.validate`` (beside the messages it checks); kept as an alias."""

from .raft.validate import *  # noqa: F401,F403
from .raft.validate import check_message, check_node_id  # noqa: F401
