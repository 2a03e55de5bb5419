"""`phi3v-edge export`: command-line front of export/bundle.py."""
from __future__ import annotations

import argparse
import sys
import time

from .bundle import ACCURACY_LEVELS, BLOCK_SIZES, PRECISIONS, TARGETS, VISION_PRECISIONS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="phi3v-edge export",
        description="Turn a Phi-3.5-vision checkpoint (Hugging Face layout) into an ONNX bundle: vision.onnx, "
                    "decoder.onnx with INT4/INT8 (MatMulNBits) or float weights, tokenizer files and manifest.json.",
        epilog="example: phi3v-edge export microsoft/Phi-3.5-vision-instruct --out phi35v-int4 --precision int4")
    p.add_argument("checkpoint", help="checkpoint directory (config.json + safetensors) or a Hugging Face repo id")
    p.add_argument("--out", required=True, help="bundle directory to create")
    p.add_argument("--precision", default="int4", choices=PRECISIONS,
                   help="decoder weights (default int4); fp32/fp16 keep float weights for parity work")
    p.add_argument("--target", default="auto", choices=TARGETS,
                   help="activation dtype: fp16 for cuda, fp32 for cpu; default auto = cuda when onnxruntime's "
                        "CUDA provider is usable on this machine, else cpu (the choice is printed)")
    p.add_argument("--vision-precision", choices=VISION_PRECISIONS, default=None,
                   help="vision encoder weights (default fp16 for cuda; for cpu int8 with an int4/int8 decoder, "
                        "else fp32)")
    p.add_argument("--block-size", type=int, default=None, choices=BLOCK_SIZES,
                   help="quantization block size of int4/int8 weights (default 64 for --target cpu int4/int8: "
                        "fewer scale bytes per decode step; 32 otherwise)")
    p.add_argument("--accuracy-level", type=int, default=None, choices=ACCURACY_LEVELS,
                   help="MatMulNBits accuracy_level of the decoder (and of the vision encoder unless "
                        "--vision-accuracy-level is given): 0 = fp32 activations, 4 = int8 activations (faster CPU "
                        "decode). Default 4 for --target cpu with int4/int8 weights, else 0 (the CUDA kernels ignore it)")
    p.add_argument("--vision-accuracy-level", type=int, default=None, choices=ACCURACY_LEVELS,
                   help="the INT8 vision encoder's accuracy_level (default: --accuracy-level when given, else 0: "
                        "images are encoded in large matmuls, where level 0 is as fast as fp32 weights and level "
                        "4 is slower on AVX2 CPUs without VNNI; try 4 on a VNNI / AMX CPU)")
    p.add_argument("--asymmetric", action="store_true", help="asymmetric (min/max, with zero points) quantization")
    p.add_argument("--lm-head-precision", choices=PRECISIONS, default=None,
                   help="lm_head weights (default: like the layers)")
    p.add_argument("--embedding-precision", choices=("fp32", "fp16", "int8"), default=None,
                   help="token embedding table (default fp16; fp32 for the fp32 precision)")
    p.add_argument("--all-logits", action="store_true", help="output logits of every position (tests); default last only")
    p.add_argument("--format", default="bundle", choices=("bundle", "genai"),
                   help="bundle (default): phi3v-edge's runtime bundle; genai: an onnxruntime-genai package "
                        "(genai_config.json, vision/embedding/text graphs) for its C, C++, C#, Java and Python APIs")
    p.add_argument("--max-length", type=int, default=None,
                   help="genai only: search.max_length in genai_config.json, the KV length onnxruntime-genai "
                        "allocates (default 4096; hosts can raise it up to max_position_embeddings)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


class _Progress:
    """One progress bar per stage (vision layers, decoder layers)."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar, self.stage = enabled, None, None

    def __call__(self, stage: str, i: int, n: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage, self.bar = stage, tqdm(total=n, desc=f"{stage:8s}", unit="layer", file=sys.stderr)
        self.bar.update(i - self.bar.n)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from phi3v_edge.models.checkpoint import CheckpointError
    from phi3v_edge.models.config import ConfigError

    from .bundle import ExportError, export_bundle, resolve_target

    bar = _Progress(not args.quiet)
    t0 = time.perf_counter()
    target = resolve_target(args.target)
    if args.target == "auto":
        print(f"target {target} (auto: " + ("onnxruntime's CUDA provider is usable here)" if target == "cuda" else
              "no usable CUDA provider here; pass --target cuda to export for a GPU machine)"), file=sys.stderr)
    try:
        export, extra = export_bundle, {}
        if args.format == "genai":
            from .genai import export_genai as export

            extra = {"max_length": args.max_length}
        elif args.max_length is not None:
            raise ExportError("--max-length is for --format genai (a bundle's runtime takes max_length when loading)")
        out = export(args.checkpoint, args.out, args.precision, target=target,
                            vision_precision=args.vision_precision, block_size=args.block_size,
                            accuracy_level=args.accuracy_level, vision_accuracy_level=args.vision_accuracy_level,
                            symmetric=not args.asymmetric, lm_head_precision=args.lm_head_precision,
                            embedding_precision=args.embedding_precision, all_logits=args.all_logits,
                            force=args.force, progress=bar, **extra)
    except (ExportError, CheckpointError, ConfigError, ValueError) as e:
        bar.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        bar.close()
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    bar.close()
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"wrote {out} ({size / 1e9:.3f} GB, target {target}) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
