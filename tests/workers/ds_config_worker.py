"""One process of tests/test_deepspeed_configs.py: builds the real DeepSpeed engine from each
named config (the JSON exactly as shipped, batch fields injected by `bertscale pretrain`'s own
`deepspeed_config`) and measures what its gradient accumulation keeps.

The model is one weight vector w (16 elements, starting at 0) and the loss of micro-batch k is
sum(w * x_k), so the gradient of micro-batch k is exactly x_k. Micro-batch 0 has x = 1/4 and
the other ACCUM - 1 have x = 1/4 / 512: in bf16 each of those is below half a unit in the last
place of the running sum (2^-8 after DeepSpeed's 1/ACCUM scaling, ulp 2^-15), so a bf16
accumulator drops every one of them, while an fp32 one keeps them. One SGD step with lr 1 makes
the fp32 master weights -mean(gradient): the result tells which accumulation the engine did.
Every value involved is a power of two, so each path's result is exact.

Prints one JSON line per config: {name, model_dtype, accum_dtype, comm_dtype, optimizer,
master}. A config whose engine cannot be built prints {"name", "error"}.
"""

from __future__ import annotations

import json
import sys

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param
from torch import nn

from bertscale.commands.pretrain import quiet_deepspeed
from bertscale.config import load_pretrain_recipe
from bertscale.pretraining.plan import deepspeed_config

ACCUM = 64
SMALL = 0.25 / 512


class Dot(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.w * x).sum()


def build(name: str, drop_accum_dtype: bool) -> dict:
    recipe = load_pretrain_recipe("tiny_ci", [f"train.deepspeed={json.dumps(name)}",
                                              f"train.global_batch_size={ACCUM}",
                                              "train.micro_batch_size=1"])
    cfg, _, precision, _, accum = deepspeed_config(recipe, world_size=1, cuda=False)
    assert accum == ACCUM
    if drop_accum_dtype:
        cfg.pop("data_types", None)
    model = Dot()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    dtype = engine.get_data_types()
    for k in range(ACCUM):
        x = torch.full((16,), 0.25 if k == 0 else SMALL, device=engine.device)
        loss = engine(x.to(next(engine.module.parameters()).dtype))
        engine.backward(loss)
        engine.step()
    master = safe_get_full_fp32_param(engine.module.w)
    out = {"model_dtype": str(dtype[0]), "accum_dtype": str(dtype[1]),
           "comm_dtype": str(engine.communication_data_type),
           "optimizer": type(engine.optimizer).__name__, "precision": precision,
           "master": master.tolist() if master is not None else None}
    engine.destroy()
    return out


def main() -> None:
    quiet_deepspeed()
    for arg in sys.argv[1:]:
        name, _, variant = arg.partition(":")
        try:
            out = build(name, drop_accum_dtype=variant == "no_accum_dtype")
        except Exception as e:  # noqa: BLE001 - reported to the test, which decides
            out = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps({"name": arg, **out}), flush=True)


if __name__ == "__main__":
    main()
