"""The comparison side of `bertscale bench quality`: `transformers`' BertForMaskedLM trained on
bertscale's batches with bertscale's optimizer and schedule, evaluated like bertscale's eval."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from bertscale.bench.quality.runs import log
from bertscale.files import write_dir_atomic


class TransformersSide:
    """`transformers`' BertForMaskedLM trained on bertscale's batches with bertscale's optimizer
    and schedule, from the recipe as `bertscale pretrain --print-config` resolved it."""

    def __init__(self, resolved: dict[str, Any], threads: int):
        import torch

        from bertscale.config import ModelConfig, OptimizerConfig, ScheduleConfig, from_dict
        from bertscale.data.loader import MaskingConfig
        from bertscale.data.shards import read_manifest

        torch.set_num_threads(threads)
        # The GPU when there is one, as `bertscale pretrain` uses it (benchmarks/gpu_quality.sh).
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        r = resolved["recipe"]
        self.model_config = from_dict(ModelConfig, r["model"], "model")
        self.optimizer = from_dict(OptimizerConfig, r["optimizer"], "optimizer")
        self.schedule = from_dict(ScheduleConfig, r["schedule"], "schedule")
        self.manifest = read_manifest(r["data"]["manifest"])
        self.masking = MaskingConfig(mask_prob=r["data"]["mask_prob"],
                                     max_predictions_per_seq=r["data"]["max_predictions_per_seq"],
                                     whole_word=r["data"]["whole_word_masking"])
        t = r["train"]
        self.seed, self.G, self.micro = t["seed"], t["global_batch_size"], t["micro_batch_size"]
        self.accum = self.G // self.micro
        self.clip = float(resolved["deepspeed"].get("gradient_clipping", 0.0))
        self.eval_micro = r["eval"]["micro_batch_size"] or self.micro

    def build_model(self) -> Any:
        import transformers

        from bertscale.hf import config_to_hf
        from bertscale.seeding import seed_all

        seed_all(self.seed)
        hf_cfg = transformers.BertConfig(**config_to_hf(self.model_config))
        hf_cfg._attn_implementation = "sdpa"  # PyTorch's fused attention, as bertscale's
        return transformers.BertForMaskedLM(hf_cfg).to(self.device).train()

    def loader(self, split: str, max_samples: int = 0) -> Any:
        from bertscale.data.loader import LoaderConfig, open_loader

        micro = self.micro if split == "train" else self.eval_micro
        return open_loader(self.manifest, LoaderConfig(
            split=split, global_batch_size=self.G if split == "train" else micro,
            micro_batch_size=micro, seed=self.seed, masking=self.masking, verify_sha256=False,
            max_samples=max_samples))

    @staticmethod
    def dense_labels(batch: dict[str, Any]) -> Any:
        """(B, T) labels for transformers' dense MLM loss from the loader's (positions, labels)."""
        from bertscale.bench.model import Batch

        return Batch(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                     batch["masked_positions"], batch["masked_labels"],
                     batch["next_sentence_label"]).dense_labels()

    def train(self, steps: int, eval_every: int, eval_samples: int,
              evaluate: bool = True) -> tuple[Any, dict[str, Any]]:
        """Train `steps` steps; returns the model and the same statistics bertscale_curve gives."""
        import torch

        from bertscale.optim import build_optimizer, build_scheduler

        model = self.build_model()
        opt = build_optimizer(self.optimizer, model)
        sched = build_scheduler(opt, self.schedule, steps)
        loader = self.loader("train")
        batches = iter(loader)
        curve: list[dict[str, Any]] = []
        tokens_per_step: list[int] = []
        times: list[float] = []

        def point(step: int) -> None:
            curve.append(dict(step=step, train_s=sum(times), tokens=sum(tokens_per_step),
                              **self.evaluate(model, eval_samples)))
            log(f"transformers step {step}: held-out mlm_loss {curve[-1]['mlm_loss']:.4f} "
                f"mlm_acc {curve[-1]['mlm_acc']:.3f}")

        try:
            if evaluate:
                point(0)
            for step in range(1, steps + 1):
                t0 = time.perf_counter()
                tokens = 0
                for _ in range(self.accum):
                    cpu = next(batches)  # labels and token counts made on the host: no sync
                    labels = self.dense_labels(cpu).to(self.device)
                    b = {k: v.to(self.device) for k, v in cpu.items()}
                    loss = model(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"],
                                 attention_mask=b["attention_mask"], labels=labels).loss
                    (loss / self.accum).backward()  # DeepSpeed divides by the accumulation too
                    tokens += int(cpu["attention_mask"].sum())
                if self.clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), self.clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()  # the step's time is the device's
                times.append(time.perf_counter() - t0)
                tokens_per_step.append(tokens)
                if evaluate and (step % eval_every == 0 or step == steps):
                    point(step)
        finally:
            loader.close()
        return model, dict(curve=curve, steps=steps, train_s=sum(times),
                           tokens=sum(tokens_per_step), tokens_per_step=tokens_per_step,
                           step_time_s=times, torch_threads=torch.get_num_threads())

    def evaluate(self, model: Any, samples: int) -> dict[str, Any]:
        """Token-weighted MLM loss and accuracy over the first `samples` held-out samples, the
        masked positions only (bertscale's own eval does the same sums)."""
        import torch
        import torch.nn.functional as F

        loader = self.loader("eval", max_samples=samples)
        loss_sum, correct, count, n = 0.0, 0, 0, 0
        V = self.manifest.vocab_size
        model.eval()
        try:
            it = iter(loader)
            with torch.no_grad():
                for _ in range(len(loader)):
                    b = {k: v.to(self.device) for k, v in next(it).items()}
                    logits = model(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"],
                                   attention_mask=b["attention_mask"]).logits    # (B, T, V)
                    valid = b["masked_labels"] != -100                          # (B, P)
                    rows = torch.arange(logits.shape[0], device=self.device)[:, None].expand_as(valid)
                    picked = logits[rows[valid], b["masked_positions"][valid]][:, :V].float()
                    labels = b["masked_labels"][valid]
                    loss_sum += float(F.cross_entropy(picked, labels, reduction="sum"))
                    correct += int((picked.argmax(-1) == labels).sum())
                    count += int(valid.sum())
                    n += int((b["sample_ids"] >= 0).sum())
        finally:
            model.train()
            loader.close()
        return dict(mlm_loss=loss_sum / max(count, 1), mlm_acc=correct / max(count, 1),
                    eval_samples=n)


def save_hf_folder(model: Any, vocab: Path, lowercase: bool, out: Path) -> None:
    """transformers' own save_pretrained plus the tokenizer files, put in place whole."""
    def fill(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        shutil.copyfile(vocab, tmp / "vocab.txt")
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "BertTokenizer", "do_lower_case": lowercase}) + "\n")
    write_dir_atomic(out, fill, replace=True)
