"""Worker for the expert-parallel tests: `torchrun --nproc_per_node 2 ep_driver.py OUT SPEC`.

SPEC (JSON): {"rl_cfg": path, "sft_argv": [...] or null}. Every rank records how its experts
are laid out under `distributed.expert_parallel_size=2` (the local shard of each 3-D expert
weight), runs the RL update check of `fsdp_driver._one_case` (2 EP ranks x half the groups
against one process on all groups, GSPO and GRPO), then the `moepost train` run of `sft_argv`.
Rank 0 writes OUT/results.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from moepost.cli import main as cli_main
from moepost.components.model.loading import load_policy
from moepost.config.load import load_config
from moepost.distributed import init_distributed, prepare_model

sys.path.insert(0, str(Path(__file__).parent))
from fsdp_driver import _one_case  # noqa: E402

EP = ["distributed.expert_parallel_size=2"]


def expert_layout(rl_cfg: str) -> dict[str, Any]:
    """Global and local shapes of every 3-D expert weight, and the experts' local count."""
    cfg = load_config(rl_cfg, ["distributed.enabled=true", "distributed.backend=fsdp", *EP])
    ctx = init_distributed(cfg, torch.device("cpu"))
    model = load_policy(cfg.model, cfg.misc, device=torch.device("cpu"))
    prepare_model(model, cfg, ctx)
    shapes = {}
    for name, param in model.named_parameters():
        if ".experts." in name:
            mesh = param.device_mesh
            shapes[name] = {
                "global": list(param.shape),
                "local": list(param.to_local().shape),
                "mesh": list(mesh.mesh_dim_names or ()),
            }
    experts = [m for m in model.modules() if type(m).__name__.endswith("Experts")]
    return {"params": shapes, "local_num_experts": sorted({int(m.num_experts) for m in experts})}


def main() -> None:
    out, spec = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    tdist.init_process_group("gloo")  # the recipes join it instead of creating their own
    rank, world = tdist.get_rank(), tdist.get_world_size()
    results: dict[str, Any] = {"layout": expert_layout(spec["rl_cfg"])}
    results["update"] = {
        name: _one_case(spec["rl_cfg"], name, EP, rank, world) for name in ("gspo", "grpo")
    }
    if spec.get("sft_argv"):
        results["sft_exit"] = cli_main(spec["sft_argv"])
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    tdist.barrier()
    tdist.destroy_process_group()


if __name__ == "__main__":
    main()
