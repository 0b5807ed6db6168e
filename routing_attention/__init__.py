"""routing_attention: fast, exact, content-based sparse attention for NumPy.

Dense attention on a flash-style C tile engine (forward and backward), with the
sparse methods of the Routing Transformer, Fast Transformers' clustered attention and
Combiner built on the same engine.  Every function has a plain NumPy twin in
`routing_attention.reference`.
"""
try:
    from . import _ext
except ImportError as error:        # the C extension is not built next to this source
    raise ImportError(
        "routing_attention's C extension (routing_attention._ext) is not built for this "
        f"source tree ({__path__[0]}): run `python -m pip install -e .` in the project folder, "
        "or, after a plain `pip install .`, run Python from outside the source tree so that "
        "the installed package is imported") from error
from . import reference
from ._checks import integer as _integer
from ._ext import build_info, get_num_threads
from .clustering import (assign_clusters, assign_top_members, commitment_loss, hamming_kmeans,
                         lsh_hash, members_from_labels, spherical_kmeans, top_members,
                         update_centroids)
from .dense import attention, attention_backward
from .routing import (RoutingAttention, local_attention, local_attention_backward,
                      routing_attention, routing_attention_backward)
from .combiner import CombinerAttention, combiner_attention, combiner_attention_backward
from .clustered import (ClusteredAttention, clustered_attention, clustered_attention_backward,
                        improved_clustered_attention, improved_clustered_attention_backward)

from ._dask import dask_aware as _dask_aware

# Dask arrays in, lazy Dask arrays out; every public function exposes `.signature`
for _name in ("attention", "attention_backward", "routing_attention",
              "routing_attention_backward", "local_attention", "local_attention_backward",
              "clustered_attention", "clustered_attention_backward",
              "improved_clustered_attention", "improved_clustered_attention_backward",
              "combiner_attention", "combiner_attention_backward", "spherical_kmeans",
              "assign_clusters", "update_centroids", "commitment_loss", "top_members",
              "assign_top_members", "members_from_labels", "lsh_hash", "hamming_kmeans"):
    globals()[_name] = _dask_aware(globals()[_name])
del _name

__version__ = "0.1.0"

MAX_THREADS = 4096


def set_num_threads(n):
    """Threads used by every kernel: 1 <= n <= MAX_THREADS (4096), or 0 for the OpenMP
    default.  Raises TypeError for a non-integer and ValueError outside [0, MAX_THREADS]."""
    _ext.set_num_threads(_integer("n", n, 0, MAX_THREADS))


__all__ = [
    "attention", "attention_backward",
    "routing_attention", "routing_attention_backward", "RoutingAttention",
    "local_attention", "local_attention_backward",
    "spherical_kmeans", "assign_clusters", "update_centroids", "commitment_loss",
    "top_members", "assign_top_members", "members_from_labels", "lsh_hash", "hamming_kmeans",
    "build_info", "get_num_threads", "set_num_threads", "MAX_THREADS",
    "reference",
    "combiner_attention", "combiner_attention_backward", "CombinerAttention",
    "clustered_attention", "clustered_attention_backward",
    "improved_clustered_attention", "improved_clustered_attention_backward",
    "ClusteredAttention",
]
