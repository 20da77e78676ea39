#!/usr/bin/env python3
"""Train the two small demo LoRA adapters committed under ``tests/assets/adapters``.

Both adapters are behavioural and self-distilled from the default base model
(SmolLM2-135M-Instruct): we take the base model's own greedy answers to a set of short prompts,
rewrite them, and fine-tune a LoRA on the rewritten answers (loss on answer tokens only).

* ``upper``: answers in ALL CAPS (r=8, alpha=16, all seven Llama projections).
* ``json``:  answers as a JSON object ``{"answer": "..."}`` (r=16, alpha=32, q/v/o/down).

The two differ in rank and target set on purpose, so tests exercise mixed shapes in one batch.
Everything is seeded and runs on one CPU thread, so a rerun reproduces the same files.
Before/after metrics are measured on held-out prompts (not in the training set), with the
"after" numbers taken from the adapter as re-loaded from disk.

Usage::

    python scripts/train_demo_adapters.py [--out tests/assets/adapters] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraplex_server.config import default_cache_dir
from loraplex_server.model.loader import embedded_model_dir

SEED = 1234
GEN_TOKENS = 48  # max new tokens when collecting the base answers
BASE_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # recorded in adapter_config.json
KEEP_FILES = {"adapter_config.json", "adapter_model.safetensors"}

TRAIN_PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "How many days are in a week?",
    "What do bees make?",
    "Give me a tip for sleeping better.",
    "What is photosynthesis?",
    "Who wrote Romeo and Juliet?",
    "What is 7 times 8?",
    "Why do we need water?",
    "Describe a cat in one sentence.",
    "What is the largest ocean on Earth?",
    "How do I boil an egg?",
    "What is a noun?",
    "Suggest a name for a pet goldfish.",
    "What causes rain?",
    "What is the boiling point of water?",
    "Tell me a fun fact about octopuses.",
    "What language is spoken in Brazil?",
    "How can I stay focused while studying?",
    "What is gravity?",
    "Name a famous painter.",
    "What does a thermometer measure?",
    "What is the opposite of hot?",
    "Write a short greeting for a birthday card.",
    "What planet is known as the Red Planet?",
    "How many legs does a spider have?",
    "What is the main ingredient in bread?",
    "Why is exercise good for you?",
    "What is a prime number?",
    "Recommend a hobby for a rainy day.",
    "What is the tallest animal?",
    "How do plants drink water?",
    "What is the freezing point of water in Fahrenheit?",
    "What is the sun made of?",
    "Give one reason to read books.",
    "What is a verb?",
    "How do airplanes fly?",
    "What is the capital of Japan?",
    "What sound does a dog make?",
    "Explain what a computer is.",
    "What fruit is yellow and curved?",
    "What is the speed of light?",
    "Why do leaves change color in autumn?",
    "What is democracy?",
    "Name a musical instrument with strings.",
    "What should I pack for a beach trip?",
    "How many continents are there?",
    "What is the chemical symbol for gold?",
    "What is a healthy breakfast?",
    "Who was Albert Einstein?",
    "What is the moon?",
    "How do you say hello in Spanish?",
    "What is recycling?",
    "Describe the ocean in one sentence.",
    "What is an island?",
    "Give me a word that rhymes with cat.",
]

HELD_OUT_PROMPTS = [
    "What is the capital of Italy?",
    "Name a fruit that is red.",
    "Why is the sky blue?",
    "How many hours are in a day?",
    "What is a volcano?",
    "Give me a tip for learning a new language.",
    "Who painted the Mona Lisa?",
    "What do cows eat?",
    "What is the largest planet in our solar system?",
    "Describe a tree in one sentence.",
    "What is electricity?",
    "How do fish breathe?",
]


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    r: int
    alpha: int
    targets: tuple[str, ...]
    lr: float
    eval_tokens: int  # max new tokens when measuring behaviour


SPECS = {
    "upper": AdapterSpec(
        "upper", 8, 16,
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        2e-3, 48,
    ),
    "json": AdapterSpec("json", 16, 32, ("q_proj", "v_proj", "o_proj", "down_proj"), 2e-3, 96),
}


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def load_base(model_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    return model


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> tuple[list[int], bool]:
    """Greedy continuation of one chat prompt: (new token ids without the stop token, stopped)."""
    ids = torch.tensor([prompt_ids(tokenizer, prompt)])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    new = out[0, ids.shape[1]:].tolist()
    if tokenizer.eos_token_id in new:
        return new[: new.index(tokenizer.eos_token_id)], True
    return new, False


def clean_answer(text: str, stopped: bool) -> str:
    """The base answer as a training target: a cut-off answer is trimmed to its last full sentence."""
    text = text.strip()
    if not stopped:
        ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
        if ends and ends[-1] >= 20:
            text = text[: ends[-1]]
    return text


def rewrite(kind: str, answer: str) -> str:
    if kind == "upper":
        return answer.upper()
    if kind == "json":
        return json.dumps({"answer": answer}, ensure_ascii=False)
    raise ValueError(kind)


def upper_share(texts: list[str]) -> float:
    letters = [c for t in texts for c in t if c.isalpha()]
    return sum(c.isupper() for c in letters) / max(1, len(letters))


def parses_as_object(text: str) -> bool:
    text = text.strip()
    for stop in ("<|im_end|>", "<|endoftext|>"):
        if text.endswith(stop):
            text = text[: -len(stop)].rstrip()
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def json_share(texts: list[str]) -> float:
    return sum(parses_as_object(t) for t in texts) / max(1, len(texts))


METRICS = {"upper": ("uppercase letter share", upper_share), "json": ("JSON object share", json_share)}


def build_examples(tokenizer, prompts, answers, kind):
    examples = []
    for prompt, answer in zip(prompts, answers, strict=True):
        p = prompt_ids(tokenizer, prompt)
        a = tokenizer(rewrite(kind, answer), add_special_tokens=False)["input_ids"]
        a = a + [tokenizer.eos_token_id]
        examples.append((p + a, [-100] * len(p) + a))
    return examples


def collate(batch, pad_id):
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return ids, labels, mask


def train_adapter(spec, model_dir, tokenizer, prompts, answers, steps, batch_size, out_dir, save_dtype):
    seed_all(SEED)
    base = load_base(model_dir)
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=0.0,
        target_modules=list(spec.targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    model.print_trainable_parameters()
    examples = build_examples(tokenizer, prompts, answers, spec.name)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.1, 1 - s / steps)
    )
    rng = random.Random(SEED)
    order: list[int] = []
    model.train()
    start = time.time()
    for step in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order += fresh
        batch = [examples[i] for i in order[:batch_size]]
        del order[:batch_size]
        ids, labels, mask = collate(batch, tokenizer.eos_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 5 == 0 or step == steps - 1:
            print(f"  [{spec.name}] step {step + 1}/{steps} loss {loss.item():.4f} "
                  f"({time.time() - start:.0f}s)", flush=True)
    elapsed = time.time() - start
    model.eval()

    target = out_dir / spec.name
    if target.exists():
        shutil.rmtree(target)
    model.to(save_dtype)  # only the LoRA weights are saved; fp16 halves the file
    model.save_pretrained(str(target), safe_serialization=True)
    for extra in target.iterdir():
        if extra.name not in KEEP_FILES:
            shutil.rmtree(extra) if extra.is_dir() else extra.unlink()
    cfg_path = target / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = BASE_MODEL_NAME  # not this machine's cache path
    cfg["target_modules"] = sorted(cfg["target_modules"])  # PEFT writes a set: order varies by run
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return elapsed


def evaluate(spec, model_dir, tokenizer, adapter_dir, base_new):
    """Greedy answers on the held-out prompts from the adapter as saved on disk."""
    model = PeftModel.from_pretrained(load_base(model_dir), str(adapter_dir))
    model.eval()
    label, metric = METRICS[spec.name]
    base_texts = [tokenizer.decode(b[: spec.eval_tokens], skip_special_tokens=True) for b, _ in base_new]
    tuned = [greedy(model, tokenizer, p, spec.eval_tokens) for p in HELD_OUT_PROMPTS]
    tuned_texts = [tokenizer.decode(t, skip_special_tokens=True) for t, _ in tuned]
    before, after = metric(base_texts), metric(tuned_texts)
    print(f"\n[{spec.name}] held-out {label}: before {before:.3f} -> after {after:.3f}")
    for prompt, (b, _), (t, stopped) in zip(HELD_OUT_PROMPTS, base_new, tuned, strict=True):
        print(f"  prompt: {prompt!r}")
        print(f"    base    : {tokenizer.decode(b, skip_special_tokens=True)!r}")
        print(f"    adapter : {tokenizer.decode(t, skip_special_tokens=True)!r} (stopped={stopped})")
        print(f"    base16  : {tokenizer.decode(b[:16])!r} {b[:16]}")
        print(f"    adapt16 : {tokenizer.decode(t[:16])!r} {t[:16]}")
    return before, after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("tests/assets/adapters"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--only", choices=sorted(SPECS), action="append",
                        help="train only this adapter (repeatable); default: all")
    parser.add_argument("--save-dtype", choices=("float16", "float32"), default="float16")
    args = parser.parse_args()

    torch.set_num_threads(1)  # a small shared CPU: oversubscription is catastrophically slow
    torch.use_deterministic_algorithms(True, warn_only=True)
    seed_all(SEED)
    save_dtype = getattr(torch, args.save_dtype)

    model_dir = embedded_model_dir(default_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    assert not set(TRAIN_PROMPTS) & set(HELD_OUT_PROMPTS)

    t0 = time.time()
    base = load_base(model_dir)
    answers = []
    for prompt in TRAIN_PROMPTS:
        new, stopped = greedy(base, tokenizer, prompt, GEN_TOKENS)
        text = tokenizer.decode(new, skip_special_tokens=True)
        assert isinstance(text, str)  # one sequence decodes to one string
        answers.append(clean_answer(text, stopped))
    eval_tokens = max(s.eval_tokens for s in SPECS.values())
    base_held = [greedy(base, tokenizer, p, eval_tokens) for p in HELD_OUT_PROMPTS]
    del base
    print(f"collected base answers for {len(TRAIN_PROMPTS)} train + {len(HELD_OUT_PROMPTS)} held-out "
          f"prompts in {time.time() - t0:.0f}s", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name in args.only or list(SPECS):
        spec = SPECS[name]
        print(f"\ntraining {name}: r={spec.r} alpha={spec.alpha} targets={list(spec.targets)} "
              f"lr={spec.lr} steps={args.steps} batch={args.batch_size}", flush=True)
        elapsed = train_adapter(spec, model_dir, tokenizer, TRAIN_PROMPTS, answers, args.steps,
                                args.batch_size, args.out, save_dtype)
        before, after = evaluate(spec, model_dir, tokenizer, args.out / name, base_held)
        size = (args.out / name / "adapter_model.safetensors").stat().st_size
        summary[name] = (before, after, elapsed, size)

    print("\nsummary (held-out prompts, greedy):")
    for name, (before, after, elapsed, size) in summary.items():
        print(f"  {name:5s} {METRICS[name][0]}: {before:.3f} -> {after:.3f}; "
              f"train {elapsed:.0f}s; adapter_model.safetensors {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
