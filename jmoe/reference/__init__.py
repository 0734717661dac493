"""Pure-jnp reference of every jmoe operation: the CPU path and the kernels' oracle."""

from jmoe.reference.activations import ACTIVATIONS, GATED_ACTIVATIONS, apply_activation, is_gated
from jmoe.reference.dispatch import combine_sorted, one_hot_dispatch, sort_by_expert
from jmoe.reference.grouped_matmul import grouped_matmul
from jmoe.reference.tgmm import tgmm, tgmm_vjp
from jmoe.reference.losses import load_balancing_loss, router_z_loss
from jmoe.reference.moe import aux_from_routing, expert_ffn, expert_ffn_one_hot, moe
from jmoe.reference.routing import (
    DROP_POLICIES,
    capacity_positions,
    compute_capacity,
    jitter,
    jitter_noise,
    route,
    router_logits,
)

__all__ = [
    "ACTIVATIONS", "DROP_POLICIES", "GATED_ACTIVATIONS", "apply_activation",
    "aux_from_routing", "capacity_positions", "combine_sorted", "compute_capacity",
    "expert_ffn", "expert_ffn_one_hot", "grouped_matmul", "is_gated", "jitter",
    "jitter_noise", "load_balancing_loss", "moe", "one_hot_dispatch", "route",
    "router_logits", "router_z_loss", "sort_by_expert", "tgmm", "tgmm_vjp",
]
