"""Peak memory of `tokenpacker-hf convert` on a synthetic multi-GB original checkpoint.

Writes an original-layout TokenPacker checkpoint (`LlavaLlamaForCausalLM` keys with the real CLIP
ViT-L/14-336 tower, the projector at its real widths and a Llama LM; fp16 `.bin` shards with an index, a 32000-token
tokenizer without `<image>`, so the vocabulary-padding path runs), converts it with the command line in a child
process and reports that child's peak resident memory (`ru_maxrss` from `os.wait4`) next to the largest shard and
the total size. A second child that only imports the converter gives the interpreter + torch + transformers
baseline. The checkpoint is zero-filled (memory does not depend on values) and deleted afterwards.

The harness itself imports only the standard library and writes the checkpoint in a child of its own (except with
`--smoke`, which checks the script rather than memory): on Linux a
child's `ru_maxrss` also counts the memory its parent held when it was spawned (the parent's high-water mark is
folded in at `exec`), so a parent holding torch or a 1 GB shard would inflate every measurement.

Usage:
    python benchmarks/bench_convert_memory.py                      # ~2.9 GB in 3 shards (needs ~6 GB of disk)
    python benchmarks/bench_convert_memory.py --layers 40 --hidden 5120 --intermediate 13824   # 13B-shaped, ~27 GB
    python benchmarks/bench_convert_memory.py --smoke --output smoke.json                    # tiny, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14)  # fmt: skip
TINY_TOWER = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=24, num_attention_heads=1, image_size=24,
                  patch_size=2)  # fmt: skip


def parse_args(description: str = __doc__, result_name: str = "convert_memory.json",
               written: str = "the checkpoints") -> argparse.Namespace:  # fmt: skip
    """The command line of this benchmark and `bench_compose_memory.py`, which writes `written` (a synthetic
    tower and LLM of the given shape) under --workdir and its report to benchmarks/results/`result_name`."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048, help="LLM width")
    parser.add_argument("--intermediate", type=int, default=5504, help="LLM MLP width")
    parser.add_argument("--layers", type=int, default=20, help="LLM layers")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shards", type=int, default=3, help="LLM shards")
    parser.add_argument("--smoke", action="store_true", help="tiny tower and LLM: checks the script, not memory")
    parser.add_argument("--workdir", type=Path, default=None, help=f"where {written} go (default: a temp dir)")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / result_name)
    parser.add_argument("--write-only", type=Path, default=None, help=argparse.SUPPRESS)  # the writer child
    args = parser.parse_args()
    if args.smoke:
        args.hidden, args.intermediate, args.layers, args.vocab = 64, 128, 2, 300
    return args


def original_shapes(args: argparse.Namespace) -> tuple[dict, dict, dict]:
    """Key -> (shape, dtype) of the original checkpoint, from meta-device modules with the original names, plus
    the Llama and CLIP settings."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO / "tests"))
    from reference.original_tokenpacker import OriginalTokenPacker

    tower = TINY_TOWER if args.smoke else CLIP_L_336
    llama = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                 num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 128))  # fmt: skip
    with torch.device("meta"):
        modules = {
            "model.vision_tower.vision_tower.vision_model.": CLIPVisionModel(CLIPVisionConfig(**tower)),
            "model.mm_projector.": OriginalTokenPacker(
                raw_grid=tower["image_size"] // tower["patch_size"], embed_dim=tower["hidden_size"],
                num_heads=max(1, tower["hidden_size"] // 128), hidden_size=args.hidden, kv_dim=tower["hidden_size"],
            ),
            "": LlamaForCausalLM(LlamaConfig(**llama)),
        }  # fmt: skip
    shapes = {
        prefix + key: (t.shape, torch.float16) for prefix, m in modules.items() for key, t in m.state_dict().items()
    }
    head_dim = args.hidden // llama["num_attention_heads"]
    for layer in range(args.layers):  # transformers 4.31 saved Llama's rotary buffers
        shapes[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = (torch.Size([head_dim // 2]), torch.float32)
    return shapes, llama, tower


def split_into_shards(shapes: dict, count: int) -> list[list[str]]:
    """Consecutive keys in `count` groups of about equal bytes, as `save_pretrained`'s size-based sharding does."""
    import torch

    sizes = {key: shape.numel() * torch.empty((), dtype=dtype).element_size() for key, (shape, dtype) in shapes.items()}
    total, groups, running = sum(sizes.values()), [[] for _ in range(count)], 0
    for key, size in sizes.items():
        groups[min(count - 1, running * count // total)].append(key)
        running += size
    return [group for group in groups if group]


def word_tokenizer(size: int):
    """A `size`-token word-level tokenizer with LLaMA's special ids and no `<image>`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>"])}
    vocab.update({f"w{i}": i for i in range(3, size)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")  # fmt: skip


def write_original(folder: Path, args: argparse.Namespace) -> list[int]:
    """Writes the zero-filled checkpoint shard by shard (one shard in memory at a time); returns shard sizes."""
    import torch
    from tqdm.auto import tqdm

    shapes, llama, tower = original_shapes(args)
    groups = split_into_shards(shapes, args.shards)
    folder.mkdir(parents=True)
    weight_map, sizes = {}, []
    for index, keys in enumerate(tqdm(groups, desc="Writing original shards", unit="shard"), start=1):
        name = f"pytorch_model-{index:05d}-of-{len(groups):05d}.bin"
        torch.save({key: torch.zeros(shapes[key][0], dtype=shapes[key][1]) for key in keys}, folder / name)
        weight_map.update(dict.fromkeys(keys, name))
        sizes.append((folder / name).stat().st_size)
    index_json = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index_json))
    config = dict(architectures=["LlavaLlamaForCausalLM"], model_type="llava", torch_dtype="float16",
                  mm_vision_tower="openai/clip-vit-large-patch14-336", mm_vision_select_layer=-2,
                  mm_vision_select_feature="patch", mm_projector_type="tokenpacker", image_aspect_ratio="pad",
                  scale_factor=2, mm_hidden_size=tower["hidden_size"], rms_norm_eps=1e-5, max_position_embeddings=4096,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, **llama)  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    word_tokenizer(args.vocab).save_pretrained(folder)
    return sizes


def machine_and_versions() -> dict:
    """What a memory figure depends on besides the checkpoint: the machine and the library versions."""
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        "versions": {
            "python": platform.python_version(),
            "torch": version("torch"),
            "transformers": version("transformers"),
            "safetensors": version("safetensors"),
        },  # fmt: skip
    }


def write_report(report: dict, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")


def run_measured(command: list[str]) -> tuple[int, float]:
    """Runs `command` as a child; returns its own peak RSS in bytes (Linux reports KiB) and its wall time."""
    start = time.perf_counter()
    child = subprocess.Popen(command)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{command[:4]} failed with exit code {child.returncode}")
    return usage.ru_maxrss * 1024, time.perf_counter() - start


def main() -> None:
    args = parse_args()
    if args.write_only is not None:
        write_original(args.write_only, args)
        return
    workdir = Path(tempfile.mkdtemp()) if args.workdir is None else args.workdir
    src, dst = workdir / "original", workdir / "original-converted"
    try:
        writer = [sys.executable, __file__, "--write-only", str(src), "--hidden", str(args.hidden), "--intermediate",
                  str(args.intermediate), "--layers", str(args.layers), "--vocab", str(args.vocab), "--shards",
                  str(args.shards)] + (["--smoke"] if args.smoke else [])  # fmt: skip
        if args.smoke:  # the smoke run checks the script, not memory: spare it a child process
            write_original(src, args)
        else:
            subprocess.run(writer, check=True)
        sizes = [path.stat().st_size for path in sorted(src.glob("pytorch_model-*.bin"))]
        # The import baseline is the same at any size; the smoke run skips it to stay quick.
        baseline = None if args.smoke else run_measured([sys.executable, "-c", "import tokenpacker_hf.cli"])[0]
        peak, seconds = run_measured([sys.executable, "-m", "tokenpacker_hf.cli", "convert", str(src), str(dst)])
        converted = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
    finally:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    gib = 2**30
    report = {
        "shards": len(sizes),
        "total_bytes": sum(sizes),
        "largest_shard_bytes": max(sizes),
        "converted_bytes": converted,
        "peak_rss_bytes": peak,
        "import_baseline_rss_bytes": baseline,
        "peak_over_largest_shard": peak / max(sizes),
        "peak_over_total": peak / sum(sizes),
        "peak_minus_baseline_over_largest_shard": None if baseline is None else (peak - baseline) / max(sizes),
        "convert_seconds": round(seconds, 1),
        "smoke": args.smoke,
        **machine_and_versions(),
    }
    write_report(report, args.output)
    baseline_text = "-" if baseline is None else f"{baseline / gib:.2f} GiB"
    print(f"| checkpoint | largest shard | peak RSS | peak / largest shard | peak / total | import baseline |\n"
          f"|---|---|---|---|---|---|\n"
          f"| {sum(sizes) / gib:.2f} GiB in {len(sizes)} shards | {max(sizes) / gib:.2f} GiB | {peak / gib:.2f} GiB | "
          f"{report['peak_over_largest_shard']:.2f} | {report['peak_over_total']:.2f} | {baseline_text} |")  # fmt: skip
    print(f"converted in {seconds:.0f} s; wrote {args.output}")


if __name__ == "__main__":
    main()
