"""The `phi3v-edge` console script.

    phi3v-edge generate BUNDLE --prompt TEXT [--image PATH ...] ...   one reply, streamed (or --json)
    phi3v-edge chat BUNDLE ...                                        interactive multi-turn chat
    phi3v-edge verify BUNDLE                                          sha256 of every bundle file
    phi3v-edge export | demo | bench ...                              export stack (needs torch), loaded lazily

generate/chat/verify use only the torch-free runtime. Errors print `error: ...` on stderr and exit with 2
(no traceback; set PHI3V_EDGE_DEBUG=1 to see one). `verify` exits with 1 when a file does not match.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

# subcommands served by other parts of the project, imported only when chosen
DISPATCH = {
    "export": ("phi3v_edge.export.cli", "convert a Phi-3.5-vision checkpoint into an ONNX bundle (needs torch)"),
    "demo": ("phi3v_edge.models.demo", "offline demo: the bundled small model answers questions about images"),
    "bench": ("phi3v_edge.benchmarks.suite", "speed / memory / accuracy benchmarks"),
    "serve": ("phi3v_edge.runtime.server.cli", "OpenAI-compatible HTTP server over the batching engine"),
}
EXIT_ERROR = 2


class CLIError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="phi3v-edge",
        description="Phi-3.5-vision on ONNX Runtime: export a checkpoint to a bundle, then generate from it.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    g = sub.add_parser("generate", help="generate a reply to one prompt (with images), streamed or as JSON",
                       description="Generate a reply to one user message; the chat template is applied, with "
                                   "<|image_1|> .. <|image_N|> for the --image files in order.")
    g.add_argument("bundle", help="bundle directory (from `phi3v-edge export`)")
    g.add_argument("--prompt", required=True, help="the user's message")
    g.add_argument("--image", action="append", default=[], metavar="PATH", help="image file (repeatable, in order)")
    from .video import add_video_args  # --video / --frames / --fps (PyAV is imported only for a clip)

    add_video_args(g)
    g.add_argument("--system", default=None, help="optional system message")
    _add_generation_args(g)
    g.add_argument("--json", action="store_true",
                   help="print one JSON object (token_ids, text, finish_reason, timings) instead of streaming")

    c = sub.add_parser("chat", help="interactive multi-turn chat (/image PATH, /video PATH, /reset, /quit)",
                       description="Interactive chat. Type a message and press Enter. Commands: /video PATH attaches "
                                   "a clip's sampled frames (--frames / --fps) to your next message, /image PATH "
                                   "attaches an image to your next message, /reset starts over, /quit leaves.")
    c.add_argument("bundle", help="bundle directory (from `phi3v-edge export`)")
    c.add_argument("--system", default=None, help="optional system message")
    add_video_args(c, with_video=False)  # how /video samples a clip
    _add_generation_args(c)

    v = sub.add_parser("verify", help="check every bundle file against the sha256 in its manifest",
                       description="Check the bundle's format version, files and sizes, and the sha256 of every file.")
    v.add_argument("bundle", help="bundle directory")
    v.add_argument("--quiet", action="store_true", help="print nothing when the bundle is fine")

    for name, (_, text) in DISPATCH.items():
        sub.add_parser(name, help=text, add_help=False)  # listed in --help; dispatched before parsing
    return p


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-crops", type=int, default=None, metavar="K",
                   help="HD crops per image, 1..16 (default: the bundle's, 4)")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="default 256")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (the default unless a sampling option is set)")
    p.add_argument("--temperature", type=float, default=None, metavar="T", help="sample with this temperature")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling mass (implies sampling)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K most likely tokens")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="random seed (implies sampling)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R", help="default 1.0 (off)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the model's stop tokens")
    p.add_argument("--provider", choices=("auto", "cuda", "cpu"), default="auto",
                   help="execution provider (default auto: cuda when onnxruntime's CUDA provider is present and "
                        "usable here, else cpu; an explicit cuda fails clearly instead of falling back)")
    p.add_argument("--max-length", type=int, default=4096, metavar="L", help="KV cache length (default 4096)")
    p.add_argument("--long-rope", choices=("auto", "always"), default="auto",
                   help="LongRoPE factors: short up to 4096 tokens then recompute (auto), or long from the start")
    p.add_argument("--no-cuda-graph", action="store_true", help="CUDA: decode without CUDA graph replay")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU intra-op threads (default: $PHI3V_EDGE_THREADS, else the physical cores)")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in DISPATCH:
            return _dispatch(argv[0], argv[1:])
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return EXIT_ERROR
        return {"generate": cmd_generate, "chat": cmd_chat, "verify": cmd_verify}[args.command](args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except SystemExit as e:  # argparse and dispatched mains
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_ERROR)
    except Exception as e:
        if os.environ.get("PHI3V_EDGE_DEBUG"):
            raise
        msg = str(e) or type(e).__name__
        if not isinstance(e, (CLIError, ValueError, OSError, RuntimeError)):
            msg = f"{type(e).__name__}: {msg}"
        print(f"error: {msg}", file=sys.stderr)
        return EXIT_ERROR


def _dispatch(name: str, rest: list[str]) -> int:
    import importlib

    module, _ = DISPATCH[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise CLIError(f"`phi3v-edge {name}` is not available: {e} (it needs the export stack: "
                       "pip install 'phi3v-edge[export]')") from None
    rc = mod.main(rest)
    return 0 if rc is None else int(rc)


# ---- generate / chat ------------------------------------------------------------------------------
def _sampling(args) -> dict:
    sampling_set = any(v is not None for v in (args.temperature, args.top_p, args.top_k, args.seed))
    if args.greedy and sampling_set:
        raise CLIError("--greedy cannot be combined with --temperature / --top-p / --top-k / --seed")
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    kw = dict(max_new_tokens=args.max_new_tokens, num_crops=args.num_crops, stop=args.stop,
              repetition_penalty=args.repetition_penalty)
    if args.ignore_eos:
        kw["stop_ids"] = ()
    if sampling_set:
        kw.update(do_sample=True, temperature=1.0 if args.temperature is None else args.temperature,
                  top_p=1.0 if args.top_p is None else args.top_p, top_k=args.top_k or 0, seed=args.seed)
    return kw


def _runtime(args):
    from .api import Phi3VRuntime
    from .session import resolve_provider

    provider = resolve_provider(args.provider)  # the one rule: auto -> cuda when usable, else cpu
    return Phi3VRuntime(args.bundle, provider=provider, max_length=args.max_length, long_rope=args.long_rope,
                        cuda_graph=False if args.no_cuda_graph else None, threads=args.threads)


def _check_images(paths) -> None:
    for p in paths:
        if not os.path.isfile(p):
            raise CLIError(f"cannot read image {p!r}: no such file")


def _messages(system, turns) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + turns


def cmd_generate(args) -> int:
    kw = _sampling(args)
    _check_images(args.image)
    if args.video:  # bad --frames / --fps or a missing file fail before the bundle loads
        from .video import check_cli_video

        check_cli_video(args)
    rt = _runtime(args)
    from .chat_template import build_prompt

    prompt, images = build_prompt(_messages(args.system, [{"role": "user", "content": args.prompt,
                                                           "images": list(args.image)}]))
    clip = None
    if args.video:  # the clip's frames follow the --image files: budget check, then decoding
        from .video import cli_video_request

        clip = cli_video_request(rt, args, images)
        prompt, images = clip.prompt, clip.images
    if args.json:
        r = rt.generate(prompt, images, **kw)
        print(json.dumps({"token_ids": r.token_ids, "text": r.text, "finish_reason": r.finish_reason,
                          "prompt_tokens": r.prompt_tokens, "provider": rt.provider, "timings": r.timings,
                          **_video_json(clip)},
                         ensure_ascii=False))
        return 0
    stream = rt.stream(prompt, images, **kw)
    for delta in stream:
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    _print_stats(rt.last_result, rt.provider)
    return 0


MIN_RATE_STEPS = 8  # a decode rate from fewer steps is mostly timer noise: not printed


def decode_rate(timings: dict) -> str:
    """The stats line's decode rate: 'N.N tokens/s', or 'n/a (<8 steps)' when too few decode steps ran."""
    steps = int(timings.get("decode_steps", 0))
    if steps < MIN_RATE_STEPS:
        return f"n/a (<{MIN_RATE_STEPS} steps)"
    return f"{timings['tokens_per_s']:.1f} tokens/s"


def _video_json(clip) -> dict:
    from .video import timestamps_json

    return {"video": timestamps_json(clip)} if clip is not None else {}


def _print_stats(r, provider: str) -> None:
    if r is None:
        return
    t = r.timings
    print(f"[{len(r.token_ids)} tokens, finish: {r.finish_reason}; prompt {r.prompt_tokens} tokens; "
          f"preprocess {t['preprocess']:.3f}s vision {t['vision']:.3f}s prefill {t['prefill']:.3f}s "
          f"decode {t['decode']:.3f}s = {decode_rate(t)}; provider {provider}]", file=sys.stderr)


def cmd_chat(args) -> int:
    kw = _sampling(args)
    rt = _runtime(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print("phi3v-edge chat: type a message; /image PATH attaches an image, /reset starts over, /quit leaves.",
              file=sys.stderr)
    turns: list[dict] = []
    pending: list[str] = []
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit", "/q"):
            break
        if line == "/reset":
            turns, pending = [], []
            rt.reset()
            print("(conversation reset)", file=sys.stderr)
            continue
        if line.startswith("/video"):  # the clip's sampled frames, attached to the next message
            from .video import chat_video

            pending += chat_video(rt, line[len("/video"):], args)
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            if not path:
                print("error: /image needs a path", file=sys.stderr)
                continue
            problem = _unreadable_image(os.path.expanduser(path), rt)
            if problem:  # the conversation and the pending images stay as they were
                print(f"error: {problem}: the image was not added", file=sys.stderr)
            else:
                pending.append(os.path.expanduser(path))
                print(f"(image {path} attached to your next message)", file=sys.stderr)
            continue
        if line.startswith("/"):
            print(f"error: unknown command {line.split()[0]} (use /image PATH, /video PATH, /reset, /quit)",
                  file=sys.stderr)
            continue
        msg = {"role": "user", "content": line, "images": pending}
        try:
            stream = rt.chat_stream(_messages(args.system, turns + [msg]), **kw)
            if interactive:
                sys.stdout.write("assistant> ")
            for delta in stream:
                sys.stdout.write(delta)
                sys.stdout.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()
        except (ValueError, RuntimeError, OSError) as e:  # bad image, too long, ...: the session goes on
            print(f"\nerror: {e}", file=sys.stderr)
            if "max_length" in str(e):
                print("(the conversation is too long: /reset to start over)", file=sys.stderr)
            elif pending and "image" in str(e):  # an attached file changed since /image: drop them all
                pending = []
                print("(the attached images were dropped: /image PATH to attach again)", file=sys.stderr)
            continue
        pending = []
        turns += [msg, {"role": "assistant", "content": rt.last_result.text}]
        if interactive:
            _print_stats(rt.last_result, rt.provider)
    return 0


def _unreadable_image(path: str, rt) -> str | None:
    """Why the image at `path` cannot be used (decoded as the request would), or None when it can."""
    from .image_transform import DEFAULT_MAX_PIXELS, load_image

    try:
        load_image(path, getattr(getattr(rt, "processor", None), "max_pixels", DEFAULT_MAX_PIXELS))
    except (ValueError, OSError) as e:
        return str(e)
    return None


def cmd_verify(args) -> int:
    from . import bundle as fmt

    m = fmt.load_manifest(args.bundle)

    def progress(name):
        if not args.quiet:
            print(f"checking {name} ...", file=sys.stderr)

    problems = fmt.verify_bundle(args.bundle, progress)
    if problems:
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        print(f"bundle {args.bundle}: {len(problems)} of {len(m['files'])} files do not match the manifest "
              "(re-export the bundle or copy it again)", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"bundle {args.bundle}: format version {m['format_version']}, {len(m['files'])} files, all sha256 match")
    return 0


if __name__ == "__main__":
    sys.exit(main())
