"""Train the small looped-depth LM that ``loopscope demo`` captures, offline, on a 2-core CPU, in about 20 minutes.

Why: a randomly initialised looped model converges in a way that says nothing about the text. A model that has
learnt some language settles at different speeds for different tokens -- the picture of Fig. 1 / Fig. 11 of
"Scaling up Test-Time Compute with
Latent Reasoning" (Geiping et al. 2025). This script trains such a model once; its weights ship with the package in
``models/demo_model/`` and the demo loads them. Re-running it is only needed to check or change that model:

    python -m loopscope.examples.train_demo_model --out models/demo_model

Measured: trained with a mean of 8 iterations (1400 steps, 12 min), the model learnt to converge in about 5
iterations for every token alike (convergence steps at 1e-2 within 1-3 of each other); with a mean of 24 (the
defaults: 1000 steps, ~20 min) tokens converge between 5 and 17 iterations on a prompt it has not seen, which is
the spread the demo is meant to show.

How:

* Corpus: no download. The docstrings (``inspect.getdoc``) of a fixed, sorted list of standard-library modules and
  of their public classes, functions and methods, de-duplicated, in a fixed order: about 0.75 MB of English about
  programming. The text depends on the Python version (and a little on the platform), so its size and sha256 are
  written to ``training.json`` and the model card; equal hashes mean the same corpus. Every 20th docstring (5 %) is
  held out for validation.
* Tokenizer: a byte-level BPE (the ``tokenizers`` library) with 1024 ids, trained on the training docstrings, with
  the demo tokenizer's special tokens; saved as a ``PreTrainedTokenizerFast``.
* Model: the Huginn-shaped reference architecture (``huginn_reference.tiny_config`` with E=128, 4 heads, MLP 512,
  1 prelude / 2 core / 1 coda blocks, tied embeddings): about 1.2 M parameters, under 5 MB of float32 safetensors.
* Training: as Huginn, each step draws its number of iterations from a Poisson-lognormal with mean
  ``mean_recurrence`` and backpropagates through the last ``mean_backprop_depth`` of them only (the model's train
  mode does this when ``num_steps`` is None). The reference model compares labels with logits *without* shifting,
  so the labels passed are the next tokens. AdamW, linear warmup then cosine decay, gradient clipping, fixed seeds,
  two threads.

What it measured (the numbers of the shipped model are in ``demo_model/README.md`` and ``training.json``): train
and validation loss during training; at the end the validation loss of the trained model against the same
architecture with its random initial weights, and the trained model's validation loss at several test-time
iteration counts (more iterations should help, up to about the training mean and a little beyond).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import math
import platform
import random
import sys
import time
import warnings
from pathlib import Path

import torch

from ..models.demo_tokenizer import as_transformers, train_bpe
from ..models.huginn_reference import RavenReferenceForCausalLM, register, tiny_config

#: Standard-library modules whose docstrings form the corpus. Sorted, present on every CPython >= 3.10 on every
#: platform, and importable without side effects.
STDLIB_MODULES = tuple(
    sorted(
        """
        abc argparse array ast asyncio base64 bdb binascii bisect builtins bz2 calendar cmath cmd codecs codeop
        collections collections.abc colorsys concurrent.futures configparser contextlib contextvars copy copyreg csv
        dataclasses datetime decimal difflib dis doctest email email.message enum filecmp fileinput fnmatch fractions
        ftplib functools gettext glob graphlib gzip hashlib heapq hmac html html.parser http.client http.server
        imaplib importlib inspect io ipaddress itertools json locale logging logging.handlers lzma mailbox math
        mimetypes multiprocessing netrc numbers operator optparse os os.path pathlib pdb pickle pkgutil platform
        plistlib poplib pprint queue quopri random re reprlib sched secrets selectors shelve shlex shutil signal
        smtplib socket socketserver sqlite3 ssl stat statistics string struct subprocess sys tarfile tempfile
        textwrap threading time timeit tokenize trace traceback tracemalloc types typing unittest unittest.mock
        urllib.parse urllib.request uuid warnings wave weakref xml.dom.minidom xml.etree.ElementTree zipfile
        zipimport zlib
        """.split()
    )
)
MIN_DOC_CHARS = 40  # one-line docstrings ("Return self.") teach little and repeat a lot
VALIDATION_EVERY = 20  # every 20th docstring is held out: 5 %

VOCAB_SIZE = 1024
CONTEXT = 128
BATCH_SIZE = 16

#: Model shape, as overrides of ``tiny_config()``. ``block_size`` (the RoPE table) covers the demo's prompt plus
#: generated tokens with room to spare; the table is part of the saved state dict, so it is kept small.
MODEL_OVERRIDES = dict(
    n_embd=128,
    n_heads=4,
    intermediate_size=512,
    n_layers_in_prelude=1,
    n_layers_in_recurrent_block=2,
    n_layers_in_coda=1,
    block_size=256,
    mean_recurrence=24,
    mean_backprop_depth=4,
)

DEFAULTS = dict(
    steps=1000, lr=3e-3, min_lr_ratio=0.1, warmup=100, weight_decay=0.1, clip=1.0, seed=0, mean_recurrence=24
)
EVAL_EVERY = 100
EVAL_WINDOWS = 48  # validation windows of CONTEXT tokens, fixed for the whole run
EVAL_STEPS = (1, 2, 4, 8, 16, 32, 64)  # test-time iteration counts measured at the end


# ----------------------------------------------------------------------------------------------------------------
# Corpus and tokenizer
# ----------------------------------------------------------------------------------------------------------------


def build_corpus(modules: tuple[str, ...] = STDLIB_MODULES) -> list[str]:
    """Docstrings of ``modules`` and of their public classes, functions and class attributes, in a fixed order.

    Only objects defined in the module itself are taken (``obj.__module__``), so a re-exported class is read once;
    exact duplicates (inherited or shared docstrings) are kept once, at their first place.
    """
    docs: list[str] = []
    seen: set[str] = set()

    def add(doc: str | None) -> None:
        if doc and len(doc) >= MIN_DOC_CHARS and doc not in seen:
            seen.add(doc)
            docs.append(doc)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated modules and attributes warn on access
        for name in modules:
            module = importlib.import_module(name)
            add(inspect.getdoc(module))
            for attr in sorted(dir(module)):
                if attr.startswith("_"):
                    continue
                obj = getattr(module, attr)
                if not (inspect.isclass(obj) or inspect.isroutine(obj)):
                    continue
                if name != "builtins" and getattr(obj, "__module__", None) not in (name, None):
                    continue
                add(inspect.getdoc(obj))
                if inspect.isclass(obj):
                    members = vars(obj)
                    for member in sorted(members):
                        value = members[member]
                        if not member.startswith("_") and (
                            inspect.isroutine(value) or isinstance(value, (property, classmethod, staticmethod))
                        ):
                            add(inspect.getdoc(value))
    return docs


def corpus_fingerprint(docs: list[str]) -> dict:
    """Size and sha256 of the corpus (docstrings joined by blank lines, UTF-8), and where it was built."""
    data = "\n\n".join(docs).encode("utf-8")
    return {
        "documents": len(docs),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": sys.platform,
        "modules": len(STDLIB_MODULES),
    }


def split_corpus(docs: list[str]) -> tuple[list[str], list[str]]:
    """(train, validation): every ``VALIDATION_EVERY``-th docstring is held out."""
    train = [d for i, d in enumerate(docs) if i % VALIDATION_EVERY]
    val = [d for i, d in enumerate(docs) if not i % VALIDATION_EVERY]
    return train, val


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE over ``texts`` with the demo's special tokens, as a ``PreTrainedTokenizerFast``."""
    return as_transformers(train_bpe(texts, vocab_size))


def encode_stream(tokenizer, docs: list[str]) -> torch.Tensor:
    """One long id stream: ``<|begin_text|> doc <|end_text|>`` for each docstring, in order."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids: list[int] = []
    for doc in tokenizer(docs, add_special_tokens=False).input_ids:
        ids.append(bos)
        ids.extend(doc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``[B, CONTEXT]`` and next-token labels (already shifted: the model does not shift them)."""
    rows = torch.stack([stream[s : s + CONTEXT + 1] for s in starts.tolist()])
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def learning_rate(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warmup to ``peak`` over ``warmup`` steps, then cosine decay to ``min_ratio * peak`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model, inputs: torch.Tensor, labels: torch.Tensor, num_steps: int | None = None, seed: int = 1234):
    """Mean next-token loss over fixed windows at ``num_steps`` iterations (the config's mean when None).

    The random initial state s0 is drawn from a fixed seed, so two evaluations of one model agree exactly; the
    global RNG is restored afterwards so that evaluating does not change the training run.
    """
    was_training = model.training
    model.eval()
    rng_state = torch.get_rng_state()
    torch.manual_seed(seed)
    losses = []
    for i in range(0, len(inputs), BATCH_SIZE):
        out = model(inputs[i : i + BATCH_SIZE], labels=labels[i : i + BATCH_SIZE], num_steps=num_steps)
        losses.append(out.loss.item() * len(inputs[i : i + BATCH_SIZE]))
    torch.set_rng_state(rng_state)
    model.train(was_training)
    return sum(losses) / len(inputs)


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (and the tied embedding); none on norms and q/k biases."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(
    out: Path,
    steps: int,
    lr: float,
    min_lr_ratio: float,
    warmup: int,
    weight_decay: float,
    clip: float,
    seed: int,
    mean_recurrence: int = 24,
    log=print,
) -> dict:
    """Build corpus, tokenizer and model; train; save model, tokenizer, ``training.json`` and ``README.md``."""
    started = time.perf_counter()
    torch.set_num_threads(2)
    random.seed(seed)
    torch.manual_seed(seed)
    register()

    docs = build_corpus()
    fingerprint = corpus_fingerprint(docs)
    train_docs, val_docs = split_corpus(docs)
    tokenizer = train_tokenizer(train_docs)
    train_ids, val_ids = encode_stream(tokenizer, train_docs), encode_stream(tokenizer, val_docs)
    log(
        f"corpus: {fingerprint['documents']} docstrings, {fingerprint['bytes']:,} bytes, sha256 "
        f"{fingerprint['sha256'][:16]}..., Python {fingerprint['python']}; tokens: {len(train_ids):,} train, "
        f"{len(val_ids):,} validation; vocab {len(tokenizer)}"
    )

    data_rng = torch.Generator().manual_seed(seed)
    val_starts = torch.linspace(0, len(val_ids) - CONTEXT - 2, EVAL_WINDOWS).long()
    val_inputs, val_labels = windows(val_ids, val_starts)
    train_probe_starts = torch.randint(0, len(train_ids) - CONTEXT - 1, (EVAL_WINDOWS,), generator=data_rng)
    train_inputs, train_labels = windows(train_ids, train_probe_starts)

    config = tiny_config(
        **{**MODEL_OVERRIDES, "mean_recurrence": mean_recurrence},
        vocab_size=len(tokenizer),
        padded_vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = RavenReferenceForCausalLM(config)
    initial_state = {k: v.clone() for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"model: {n_params:,} parameters, mean_recurrence {config.mean_recurrence}, "
        f"backprop depth {config.mean_backprop_depth}; {steps} steps of {BATCH_SIZE}x{CONTEXT} tokens "
        f"(set up in {time.perf_counter() - started:.1f}s)"
    )

    optimizer = torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95), eps=1e-8)
    history = []
    model.train()
    running, running_n = 0.0, 0
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup, min_lr_ratio)
        starts = torch.randint(0, len(train_ids) - CONTEXT - 1, (BATCH_SIZE,), generator=data_rng)
        inputs, labels = windows(train_ids, starts)
        loss = model(inputs, labels=labels).loss  # num_steps=None: Huginn's random depth, truncated backprop
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        running, running_n = running + loss.item(), running_n + 1
        if (step + 1) % EVAL_EVERY == 0 or step + 1 == steps:
            val_loss = evaluate(model, val_inputs, val_labels)
            record = {
                "step": step + 1,
                "train_loss": running / running_n,
                "val_loss": val_loss,
                "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": float(grad_norm),
                "elapsed_s": time.perf_counter() - started,
            }
            history.append(record)
            log(
                f"step {step + 1:5d}  train {record['train_loss']:.3f}  val {val_loss:.3f}  "
                f"lr {record['lr']:.2e}  |g| {record['grad_norm']:.2f}  {record['elapsed_s']:.0f}s"
            )
            running, running_n = 0.0, 0
    model.eval()

    train_loss = evaluate(model, train_inputs, train_labels)
    val_loss = evaluate(model, val_inputs, val_labels)
    by_steps = {k: evaluate(model, val_inputs, val_labels, num_steps=k) for k in EVAL_STEPS}
    random_model = RavenReferenceForCausalLM(config)
    random_model.load_state_dict(initial_state)
    random_val_loss = evaluate(random_model, val_inputs, val_labels)
    random_train_loss = evaluate(random_model, train_inputs, train_labels)
    log(
        f"final ({config.mean_recurrence} iterations): train {train_loss:.3f}  val {val_loss:.3f}; "
        f"same architecture with its random initial weights: train {random_train_loss:.3f}  val {random_val_loss:.3f}"
    )
    log("val loss by test-time iterations: " + ", ".join(f"{k}: {v:.3f}" for k, v in by_steps.items()))

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    wall = time.perf_counter() - started
    summary = {
        "command": "python -m loopscope.examples.train_demo_model --out {} {}".format(
            out.as_posix(),
            " ".join(
                f"--{k.replace('_', '-')} {v}"
                for k, v in dict(
                    steps=steps,
                    lr=lr,
                    min_lr_ratio=min_lr_ratio,
                    warmup=warmup,
                    weight_decay=weight_decay,
                    clip=clip,
                    seed=seed,
                    mean_recurrence=mean_recurrence,
                ).items()
                if v != DEFAULTS[k]
            ),
        ).strip(),
        "corpus": fingerprint,
        "tokens": {"train": len(train_ids), "validation": len(val_ids), "vocab": len(tokenizer)},
        "hyperparameters": {
            "steps": steps,
            "batch_size": BATCH_SIZE,
            "context": CONTEXT,
            "lr": lr,
            "min_lr_ratio": min_lr_ratio,
            "warmup": warmup,
            "weight_decay": weight_decay,
            "clip": clip,
            "seed": seed,
            "mean_recurrence": mean_recurrence,
            "optimizer": "AdamW(betas=(0.9, 0.95))",
            "model": {**MODEL_OVERRIDES, "mean_recurrence": mean_recurrence},
        },
        "parameters": n_params,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "wall_time_s": round(wall, 1),
        "final": {
            "train_loss": train_loss,
            "val_loss": val_loss,
            "random_init_train_loss": random_train_loss,
            "random_init_val_loss": random_val_loss,
            "val_loss_by_num_steps": by_steps,
        },
        "history": history,
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(model_card(summary), encoding="utf-8")
    log(f"saved to {out} in {wall:.0f}s")
    return summary


def model_card(summary: dict) -> str:
    """The ``README.md`` written next to the weights."""
    c, h, f = summary["corpus"], summary["hyperparameters"], summary["final"]
    by_steps = " | ".join(f"{v:.3f}" for v in f["val_loss_by_num_steps"].values())
    header = " | ".join(str(k) for k in f["val_loss_by_num_steps"])
    m = h["model"]
    return f"""# loopscope demo model

A toy looped-depth (recurrent-depth) language model of the Huginn-shaped reference architecture
(`loopscope/models/huginn_reference.py`), trained so that `loopscope demo` has a model whose tokens converge at
different speeds. **It is a toy for the demo and the tests only**: {summary["parameters"]:,} parameters, trained for
{h["steps"]} steps on under a megabyte of Python docstrings. It writes docstring-flavoured English, not sense.

- Shape: E={m["n_embd"]}, {m["n_heads"]} heads, MLP {m["intermediate_size"]}, {m["n_layers_in_prelude"]} prelude /
  {m["n_layers_in_recurrent_block"]} core / {m["n_layers_in_coda"]} coda blocks, tied embeddings, vocabulary
  {summary["tokens"]["vocab"]} (byte-level BPE), RoPE table of {m["block_size"]} positions. Trained with a random number
  of iterations per step (Poisson-lognormal, mean {m["mean_recurrence"]}) and backpropagation through the last
  {m["mean_backprop_depth"]}, as Huginn-0125; evaluated at {m["mean_recurrence"]} iterations by default.
- Corpus: `inspect.getdoc` of {c["modules"]} standard-library modules and of their public classes, functions and
  methods (see `STDLIB_MODULES` in `train_demo_model.py`), docstrings of at least {MIN_DOC_CHARS} characters,
  de-duplicated: {c["documents"]} docstrings, {c["bytes"]:,} bytes, sha256 `{c["sha256"]}`, built with
  {c["implementation"]} {c["python"]} on `{c["platform"]}`. Every {VALIDATION_EVERY}th docstring is held out;
  {summary["tokens"]["train"]:,} training and {summary["tokens"]["validation"]:,} validation tokens.
- Training: `{summary["command"]}` (seed {h["seed"]}, {h["steps"]} steps of {h["batch_size"]} x {h["context"]}
  tokens, {h["optimizer"]}, peak lr {h["lr"]}, {h["warmup"]} warmup steps then cosine to {h["min_lr_ratio"]} x,
  weight decay {h["weight_decay"]}, gradient clipping {h["clip"]}, {summary["threads"]} CPU threads, torch
  {summary["torch"]}): {summary["wall_time_s"]:.0f} s wall in all.
- Validation loss (nats/token, {m["mean_recurrence"]} iterations): **{f["val_loss"]:.3f}** trained,
  {f["random_init_val_loss"]:.3f} for the same architecture with its random initial weights (train windows:
  {f["train_loss"]:.3f} vs {f["random_init_train_loss"]:.3f}).
- Validation loss by test-time iterations:

  | iterations | {header} |
  |---|{"---|" * len(f["val_loss_by_num_steps"])}
  | loss | {by_steps} |

`training.json` holds the same figures and the loss curve. A re-run on another Python version builds a different
corpus (compare the sha256) and so a different model.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the weights, tokenizer and card")
    for name, value in DEFAULTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    train(**vars(args))


if __name__ == "__main__":
    main()
