"""``kda-generate`` / ``python -m kda_jax.inference.generate``: sample text from a trained model.

    kda-generate --workdir runs/shakespeare_small --prompt "ROMEO:" --max_new_tokens 200
    kda-generate --hf_checkpoint path/to/Kimi-Linear --tokenizer path/to/tokenizer.json --prompt "..."

A kda-jax workdir gives the model (its saved gin config) and the newest good checkpoint; a
Hugging Face Kimi-Linear checkpoint is converted on load (``kda_jax.convert``) and needs its
tokenizer file. Tokens are printed as they are sampled (``--no_stream`` prints at the end).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile


def load_workdir(workdir):
    """(model, tokenizer, step) from the newest good checkpoint of a kda-jax training workdir."""
    from kda_jax.data import tokenizer_for
    from kda_jax.train.checkpoint import Checkpointer, read_config
    from kda_jax.train.config import MeshConfig, parse
    from kda_jax.train.mesh import make_mesh
    from kda_jax.train.trainer import Trainer

    ckpt_dir = pathlib.Path(workdir) / "checkpoints"
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"{workdir} has no checkpoints/ folder: is it a kda-jax training workdir?")
    with tempfile.NamedTemporaryFile("w", suffix=".gin") as f:
        f.write(read_config(ckpt_dir))
        f.flush()
        run = parse([f.name])
    import jax

    trainer = Trainer.build(run.model, run.optim, run.train, make_mesh(MeshConfig(), jax.devices()[:1]))
    with Checkpointer(ckpt_dir, async_save=False) as ckpt:
        step = ckpt.latest_good_step()
        if step is None:
            raise FileNotFoundError(f"no good checkpoint in {ckpt_dir}")
        state, step, _ = ckpt.restore_or_init(trainer.abstract_state, trainer.init)
    return trainer.model(jax.device_get(state)), tokenizer_for(run.data), step


def load_hf(directory, tokenizer_file, dtype):
    from kda_jax.convert import load_hf_checkpoint
    from kda_jax.data.tokenizers import make_tokenizer

    return load_hf_checkpoint(directory, dtype=dtype), make_tokenizer(str(tokenizer_file))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="kda-generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a kda-jax training workdir (checkpoints/ inside)")
    src.add_argument("--hf_checkpoint", help="a Hugging Face Kimi-Linear checkpoint folder")
    ap.add_argument("--tokenizer", help="tokenizer file (*.json or *.tiktoken) for --hf_checkpoint")
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype for --hf_checkpoint")
    ap.add_argument("--prompt", action="append", default=[], help="prompt text; repeat for a batch")
    ap.add_argument("--max_new_tokens", type=int, default=200)
    ap.add_argument("--max_len", type=int, default=None, help="cache slots (default: padded prompt + new tokens)")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top_k", type=int, default=0)
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop", action="append", default=[], help="stop text (its first token id stops a row)")
    ap.add_argument("--no_stream", action="store_true")
    args = ap.parse_args(argv)
    if args.hf_checkpoint and not args.tokenizer:
        ap.error("--hf_checkpoint needs --tokenizer")
    from kda_jax.inference.generator import Generator, _bucket
    from kda_jax.inference.sampling import Sampling

    if args.workdir:
        model, tok, step = load_workdir(args.workdir)
        print(f"# {args.workdir} step {step}", file=sys.stderr)
    else:
        model, tok = load_hf(args.hf_checkpoint, args.tokenizer, args.dtype)
    prompts = args.prompt or ["\n"]
    ids = [list(tok.encode(p)) or [0] for p in prompts]
    max_len = args.max_len or _bucket(max(map(len, ids)), 64) + args.max_new_tokens
    gen = Generator(model, max_len=max_len,
                    sampling=Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p))
    stop = [tok.encode(s)[0] for s in args.stop if tok.encode(s)]
    stream = not args.no_stream and len(prompts) == 1
    if stream:
        sys.stdout.write(prompts[0])

    def on_token(i, new):
        if stream:
            sys.stdout.write(tok.decode([int(new[0])]))
            sys.stdout.flush()

    out = gen.generate(ids, args.max_new_tokens, seed=args.seed, stop_tokens=stop, on_token=on_token)
    if stream:
        sys.stdout.write("\n")
    else:
        for p, o in zip(prompts, out):
            print(p + tok.decode(o))
            print("-" * 40)
    return 0


if __name__ == "__main__":
    sys.exit(main())
