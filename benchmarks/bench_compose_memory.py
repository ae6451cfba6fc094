"""Peak memory of composing a new TokenPacker model from a pretrained vision tower and a pretrained LLM
(`TokenPackerProcessor.from_vision_text_pretrained` +
`TokenPackerForConditionalGeneration.from_vision_text_pretrained`).

Writes a synthetic pair, zero-filled float16 safetensors (memory does not depend on values): a CLIP ViT-L/14-336
`CLIPVisionModel` folder and a Llama `LlamaForCausalLM` folder in several shards with a 32000-token tokenizer
without `<image>` (so the embedding-resize path runs), about 2.9 GB together. A child process composes them in
float16, reads every weight once (they may stay memory-mapped until first read) and reports its peak resident
memory (`ru_maxrss` from `os.wait4`) next to the size of both parts; a second child that only imports the package
gives the interpreter + torch + transformers baseline. The folders are deleted afterwards. The target is a peak of
at most 1.3 × the model's size: each weight is loaded once, into the module that keeps it.

As in `bench_convert_memory.py`, the harness writes the pair in a child of its own (except with `--smoke`): on
Linux a child's `ru_maxrss` includes the parent's high-water mark at `exec`.

Usage:
    python benchmarks/bench_compose_memory.py                       # ~2.9 GB (needs ~3 GB of disk)
    python benchmarks/bench_compose_memory.py --smoke --output smoke.json   # tiny, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_convert_memory import (  # noqa: E402
    CLIP_L_336,
    TINY_TOWER,
    machine_and_versions,
    parse_args,
    run_measured,
    split_into_shards,
    word_tokenizer,
    write_report,
)

REPO = Path(__file__).resolve().parents[1]

COMPOSE = """
import sys, torch
from tokenpacker_hf import TokenPackerForConditionalGeneration, TokenPackerProcessor
vision, text, layers = sys.argv[1], sys.argv[2], [int(i) for i in sys.argv[3].split(",")]
processor = TokenPackerProcessor.from_vision_text_pretrained(vision, text, region_feature_layers=layers)
model = TokenPackerForConditionalGeneration.from_vision_text_pretrained(
    vision, text, processor=processor, dtype=torch.float16, region_feature_layers=layers)
assert not any(p.is_meta for p in model.parameters())
# Weights may stay memory-mapped from the safetensors files until first read: read every one, so the peak counts
# the whole model as training would.
assert all(torch.isfinite(p.detach().sum()) for p in model.parameters())
"""


def write_zero_safetensors(model, folder: Path, shards: int) -> int:
    """Saves `model`'s config and zero-filled float16 weights in `shards` safetensors files with an index, one
    shard in memory at a time; returns the bytes written."""
    import torch
    from safetensors.torch import save_file

    shapes = {key: (tensor.shape, torch.float16) for key, tensor in model.state_dict().items()}
    groups = split_into_shards(shapes, shards)
    folder.mkdir(parents=True)
    weight_map, total = {}, 0
    for index, keys in enumerate(groups, start=1):
        name = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        save_file(
            {key: torch.zeros(shapes[key][0], dtype=torch.float16) for key in keys},
            folder / name,
            metadata={"format": "pt"},
        )
        weight_map.update(dict.fromkeys(keys, name))
        total += (folder / name).stat().st_size
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    model.config.save_pretrained(folder)
    return total


def write_parts(workdir: Path, args: argparse.Namespace) -> None:
    """The tower and the LLM folders under `workdir`, built on the meta device (no weights in memory)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    tower = TINY_TOWER if args.smoke else CLIP_L_336
    llama = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 128),
                        tie_word_embeddings=False, dtype="float16")  # fmt: skip
    with torch.device("meta"):
        vision_model = CLIPVisionModel(CLIPVisionConfig(**tower, dtype="float16"))
        language_model = LlamaForCausalLM(llama)
    write_zero_safetensors(vision_model, workdir / "tower", 1)
    write_zero_safetensors(language_model, workdir / "llm", args.shards)
    word_tokenizer(args.vocab).save_pretrained(workdir / "llm")


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def main() -> None:
    args = parse_args(__doc__, "compose_memory.json", "the parts")
    if args.write_only is not None:
        write_parts(args.write_only, args)
        return
    workdir = Path(tempfile.mkdtemp()) if args.workdir is None else args.workdir
    tower, llm = workdir / "tower", workdir / "llm"
    layers = "1,2,3" if args.smoke else "12,16,22,23"
    try:
        if args.smoke:  # the smoke run checks the script, not memory: spare it a child process
            write_parts(workdir, args)
        else:
            subprocess.run([sys.executable, __file__, "--write-only", str(workdir)], check=True)
        tower_bytes, llm_bytes = folder_bytes(tower), folder_bytes(llm)
        llm_shards = len(list(llm.glob("*.safetensors")))
        baseline = None if args.smoke else run_measured([sys.executable, "-c", "import tokenpacker_hf"])[0]
        peak, seconds = run_measured([sys.executable, "-c", COMPOSE, str(tower), str(llm), layers])
    finally:
        shutil.rmtree(tower, ignore_errors=True)
        shutil.rmtree(llm, ignore_errors=True)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    gib, total = 2**30, tower_bytes + llm_bytes
    report = {
        "tower_bytes": tower_bytes,
        "llm_bytes": llm_bytes,
        "llm_shards": llm_shards,
        "model_bytes": total,
        "peak_rss_bytes": peak,
        "import_baseline_rss_bytes": baseline,
        "peak_over_model": peak / total,
        "peak_minus_baseline_over_model": None if baseline is None else (peak - baseline) / total,
        "compose_seconds": round(seconds, 1),
        "smoke": args.smoke,
        **machine_and_versions(),
    }
    write_report(report, args.output)
    baseline_text = "-" if baseline is None else f"{baseline / gib:.2f} GiB"
    print(
        f"| tower + LLM | peak RSS | peak / model | import baseline |\n|---|---|---|---|\n"
        f"| {tower_bytes / gib:.2f} + {llm_bytes / gib:.2f} GiB ({llm_shards} shards) | {peak / gib:.2f} GiB | "
        f"{report['peak_over_model']:.2f} | {baseline_text} |"
    )
    print(f"composed in {seconds:.0f} s; wrote {args.output}")


if __name__ == "__main__":
    main()
