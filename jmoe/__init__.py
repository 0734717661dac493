"""jmoe: Mixture-of-Experts kernels in Triton for JAX.

Public API::

  jmoe.grouped_matmul(lhs, rhs, group_sizes, *, backend)   # jax.lax.ragged_dot semantics
  jmoe.route(x, router_kernel, *, top_k, ...) -> jmoe.Routing
  jmoe.expert_ffn(x, expert_ids, weights, kept, up_kernel, down_kernel, *, activation)
  jmoe.moe(x, params, *, top_k, capacity_factor, activation, ...) -> (y, jmoe.MoEAux)
  jmoe.moe_expert_parallel(x, params, *, top_k, axis_name, ...)  # in shard_map
  jmoe.ExpertParallel(mesh, axis_name).moe(x, params, top_k=...)  # on global arrays

Flax layers live in `jmoe.nnx` and `jmoe.linen` (imported on demand).
"""

from jmoe import reference
from jmoe._backend import BACKENDS, Backend, resolve_backend
from jmoe.api import as_moe_params, expert_ffn, grouped_matmul, moe, route
from jmoe.expert_parallel import ExpertParallel, moe_expert_parallel
from jmoe.reference.activations import ACTIVATIONS, GATED_ACTIVATIONS
from jmoe.reference.routing import DROP_POLICIES, compute_capacity
from jmoe.types import MoEAux, MoEParams, Routing

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS", "BACKENDS", "Backend", "DROP_POLICIES", "ExpertParallel",
    "GATED_ACTIVATIONS",
    "MoEAux", "MoEParams", "Routing", "as_moe_params", "compute_capacity",
    "expert_ffn", "grouped_matmul", "moe", "moe_expert_parallel", "reference",
    "resolve_backend", "route",
]
