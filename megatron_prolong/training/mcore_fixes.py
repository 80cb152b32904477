"""Fixes for megatron-core 0.16.1 defects on the paths this project uses. Each says what and why.

Applied once, at start-up, by ``setup.build_optimizer`` (before any optimizer state is built or
loaded), on every device: they concern missing optional packages (apex / TE), not the CPU.
"""

from __future__ import annotations

_APPLIED = False


def apply() -> None:
    global _APPLIED
    if _APPLIED:
        return
    _keep_adam_step_on_reshardable_load()
    _unshare_adam_step_after_load()
    _APPLIED = True


def _keep_adam_step_on_reshardable_load() -> None:
    """Without apex/TE the optimizer is torch Adam, whose per-parameter state has a ``step``
    tensor. ``load_parameter_state_from_fully_reshardable`` deliberately leaves ``step`` out of
    the tensors it restores (it restores steps separately), but ``_set_main_param_and_optimizer_states``
    then copies every key of the live state and fails with ``KeyError: 'step'``. Keep the live
    ``step`` for that copy (a no-op) so the separate restore is what sets it."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state[main_param].get("step")
            if step is not None:
                tensors = {**tensors, "step": step}
        return original(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def _unshare_adam_step_after_load() -> None:
    """Without apex/TE, ``DistributedOptimizer.load_state_dict`` gives every parameter's Adam state
    *the same* ``step`` tensor; torch Adam increments it in place once per parameter, so after a
    resume the bias correction runs with step ~ N_params x steps and the losses diverge from an
    uninterrupted run. Give each parameter its own copy."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.load_state_dict

    def load_state_dict(self, state_dict):
        result = original(self, state_dict)
        for state in self.optimizer.state.values():
            if isinstance(state, dict) and "step" in state and hasattr(state["step"], "clone"):
                state["step"] = state["step"].clone()
        return result

    DistributedOptimizer.load_state_dict = load_state_dict
