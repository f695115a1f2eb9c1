"""``kv="propagate"`` (CALM): a skipped layer gets keys/values computed from the exit state.

Exited rows are frozen at their exit state in the blocks that still run for other rows; after the scan, each
block it did not reach runs only up to its attention's ``cache.update`` (a K/V-only call,
:func:`deltaexit.generation.kv.store_kv_only`) on the exit state. With ``query_skip`` (the default) those calls
replace a separate query projection by zeros, as the queries are never used: the keys/values stored are
bit-for-bit the same and the model is restored after every call. A skipped block whose cache is a recurrent state
(linear attention, Mamba) has its state advanced from the exit state instead
(:func:`deltaexit.generation.recurrent.advance_state`: the block runs until its mixer stored the state; counted in
``GenerationStats.state_calls``); a block with no cache at all (an MLP/MoE-only block) is not run.

Example:
    >>> import torch
    >>> from deltaexit.generation.early_exit import EarlyExit
    >>> from deltaexit.testing import ConstantScore, tiny_model
    >>> ee = EarlyExit(tiny_model("llama", num_layers=4), ConstantScore(), 0.5, Propagate(), min_exit_layer=2)
    >>> out = ee.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False, pad_token_id=0,
    ...                   return_dict_in_generate=True)
    >>> out.stats.kv_only_calls  # two decode steps, each skipping blocks 3 and 4
    4
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

from deltaexit.generation.kv import block_layers, cache_length, has_kv, has_state, set_cache_length, store_kv_only
from deltaexit.generation.policy import KVPolicy, register_policy
from deltaexit.generation.recurrent import advance_state
from deltaexit.generation.run import Run
from deltaexit.generation.scan import ExitScan

__all__ = ["Propagate"]


@register_policy
@dataclass(frozen=True)
class Propagate(KVPolicy):
    """CALM's propagation: skipped layers' keys/values come from the exit state.

    Args:
        query_skip: K/V-only calls skip a separate query projection (same keys/values, fewer FLOPs); False runs
            the model's own query projection there too.
    """

    name: ClassVar[str] = "propagate"
    kv_only_per_skipped_block: ClassVar[float] = 1.0

    query_skip: bool = True

    def step(self, run: Run, scan: ExitScan, state: Any) -> None:
        """One token per row: the scan with frozen exits, then K/V-only calls for the blocks it skipped."""
        start = cache_length(run.cache)
        res = scan.forward(
            run,
            run.input_ids,
            run.model_kwargs,
            start,
            max_depth=scan.num_layers,
            exits=True,
            freeze=True,
            keep_states=True,
            step=run.step,
        )
        if res.depth < scan.num_layers:
            assert res.states is not None
            h_exit = res.states[-1]  # every active row is frozen at its exit state
            runner = scan.runner
            for layer in range(res.depth, scan.num_layers):
                owned = block_layers(run.cache, layer)  # [layer], or a block's several attention sublayers
                cached = run.cache.layers[owned[0]]
                call = partial(runner.run_block, layer, h_exit, res.calls[layer])
                if has_state(cached):  # a recurrent state (and the keys/values of a hybrid layer)
                    advance_state(run.cache, layer, call)
                    run.stats.state_calls += 1
                elif has_kv(cached):  # stopped after the block's last cache write (its last sublayer's queries
                    skip = self.query_skip and len(owned) == 1  # are never used; earlier ones' are)
                    store_kv_only(run.cache, owned[-1], call, block=runner.blocks[layer], query_skip=skip)
                    run.stats.kv_only_calls += 1
        set_cache_length(run.cache, start + 1)
        logits = res.logits_fn()
        token, _, scores = run.choose(run.input_ids, logits)
        run.append(token, res.exit_layer, scores, logits)
