"""Per-row routes of a rollout, assembled from the router records of the HF engine's calls.

The HF engine runs chunks of whole groups: a prefill over the chunk's distinct prompts
(left-padded, batch-major rows) shared by their G samples, then one decode call per new token
over the B_c*G rows still in its batch (all, or the `batch_rows` recorded with the call);
decode call j feeds completion token j-1. A token that was never fed (a row's last one) gets
-1, which replay treats as "router decides". Calls tagged "idle" (lock-step generation: this
rank only keeps in step with the others) end a chunk's decode calls and belong to no row.
"""

from __future__ import annotations

from typing import Any

import torch

from moepost.components.moe.capture import RouterCapture


def _positions(rows: torch.Tensor | None, n: int) -> list[int]:
    """Position of each of n chunk rows in a decode call over `rows` (None: all), -1 if absent."""
    if rows is None:
        return list(range(n))
    at = [-1] * n
    for i, r in enumerate(rows.tolist()):
        at[r] = i
    return at


def rollout_row_routes(
    cap: RouterCapture,
    phases: list[tuple[str, torch.Tensor | None]],
    prompts: list[list[int]],
    batch: Any,
    micro_batch_size: int,
    num_layers: int,
    top_k: int,
) -> list[torch.Tensor]:
    """Per-row routes [L, len(prompt)+len(completion), K] from the records of `cap`, whose calls
    `phases` tags ("prefill" / "decode", and the chunk rows of each call)."""
    per_layer = [[r.indices for r in records] for records in cap.records]
    group = batch.group_size
    per_chunk = max(1, micro_batch_size // group) if micro_batch_size else len(prompts)
    starts = [i for i, (p, _) in enumerate(phases) if p == "prefill"]
    routes: list[torch.Tensor] = []
    for c, call0 in enumerate(starts):
        chunk = prompts[c * per_chunk : (c + 1) * per_chunk]
        p_len = max(len(p) for p in chunk)
        end = next((j for j in range(call0 + 1, len(phases)) if phases[j][0] != "decode"), None)
        end = len(phases) if end is None else end
        prefill = torch.stack([calls[call0] for calls in per_layer])  # [L, Bc*Pc, K]
        prefill = prefill.reshape(num_layers, len(chunk), p_len, top_k)
        decode = [torch.stack([calls[j] for calls in per_layer]) for j in range(call0 + 1, end)]
        where = [_positions(phases[j][1], len(chunk) * group) for j in range(call0 + 1, end)]
        for b, prompt in enumerate(chunk):
            for g in range(group):
                row = (c * per_chunk + b) * group + g
                n_comp = len(batch.completion_ids[row])
                out = prefill.new_full((num_layers, len(prompt) + n_comp, top_k), -1)
                out[:, : len(prompt)] = prefill[:, b, p_len - len(prompt) :]
                for j in range(min(n_comp, len(decode))):
                    at = where[j][b * group + g]
                    if at >= 0:  # the row was still in the batch of decode call j
                        out[:, len(prompt) + j] = decode[j][:, at]
                routes.append(out)
    return routes
