"""Type stub of the C extension: one entry per row of the registration table in
csrc/module.c.  Every gufunc takes float32 or float64 arrays (int64 for indices,
bool for flags and masks) and the usual ufunc keywords (out=, ...)."""
from typing import Any
import numpy as np

_assign_clusters: np.ufunc  # (n,d),(c,d)->(n)  (2 in, 1 out)
_attention_backward: np.ufunc  # (n,e),(n,d),(m,d),(m,e),(m),(),(n,e),(n),(),()->(n,d),(m,d),(m,e)  (10 in, 3 out)
_attention_forward: np.ufunc  # (n,d),(m,d),(m,e),(m),(),(),()->(n,e),(n)  (7 in, 2 out)
_clustered_backward: np.ufunc  # (n,e),(n,d),(m,d),(m,e),(n),(m),(),(),(),()->(n,d),(m,d),(m,e)  (10 in, 3 out)
_clustered_forward: np.ufunc  # (n,d),(m,d),(m,e),(n),(m),(),(),(),()->(n,e)  (9 in, 1 out)
_combiner_backward: np.ufunc  # (n,e),(n,d),(n,d),(n,e),(),(),(),()->(n,d),(n,d),(n,e)  (8 in, 3 out)
_combiner_forward: np.ufunc  # (n,d),(n,d),(n,e),(),(),(),()->(n,e)  (7 in, 1 out)
_commitment_loss: np.ufunc  # (n,d),(c,d),(n),(n)->()  (4 in, 1 out)
_hamming_kmeans: np.ufunc  # (n),(n),(),()->(n),(c)  (4 in, 2 out)
_lsh_hash: np.ufunc  # (n,d),(b,e)->(n)  (2 in, 1 out)
_members_from_labels: np.ufunc  # (n)->(c,s)  (1 in, 1 out)
_routing_backward: np.ufunc  # (n,e),(n,d),(m,d),(m,e),(c,w),(c,u),(),(),(),()->(n,d),(m,d),(m,e)  (10 in, 3 out)
_routing_forward: np.ufunc  # (n,d),(m,d),(m,e),(c,w),(c,u),(),(),(),()->(n,e),(n)  (9 in, 2 out)
_spherical_kmeans: np.ufunc  # (n,d),(n),(c,d),(),(),()->(c,d)  (6 in, 1 out)
_top_members: np.ufunc  # (n,c)->(c,w)  (1 in, 1 out)
_assign_top: np.ufunc  # (n,d),(c,d)->(n),(n),(c,w)  (2 in, 3 out)
_assign_best: np.ufunc  # (n,d),(c,d)->(n),(n)  (2 in, 2 out)
_update_centroids: np.ufunc  # (c,d),(n,d),(n),(n),()->(c,d)  (5 in, 1 out)

def build_info() -> dict[str, Any]: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def _fma_peak(iters: int, threads: int) -> tuple[float, float]: ...
