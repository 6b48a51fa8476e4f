"""python tools/train_tiny.py

Prints: the corpus sizes and sha256 digests, a tqdm progress bar for the
pretraining run, and at the end the held-out loss (nats/token) of the trained
model on pretrain_heldout.txt and on finetune_heldout.txt, plus a short greedy
sample.  Takes about 10-15 minutes on 2 CPU cores.

Builds the small default model that ``surgeon`` ships, so that fine-tuning
works offline:

1. writes the bundled corpus deterministically (seeded) to
   ``surgeon/assets/corpus/``:

   * ``pretrain.txt`` / ``pretrain_heldout.txt``: English prose paragraphs,
     one per line, taken from the docstrings of the Python standard library and
     from ``pydoc_data.topics`` (the Python reference text shipped with
     CPython), both under the PSF license.  The exact bytes depend on the
     CPython version whose standard library is read (the committed files come
     from CPython 3.11.7); pass ``--keep-corpus`` to train on the committed
     files instead of regenerating them.
   * ``finetune.txt`` / ``finetune_heldout.txt``: ship's-log entries, one per
     line, generated from a seeded template grammar written for this project.
     The two files hold distinct lines.

2. trains a byte-level BPE tokenizer (GPT-2 style, ``<|endoftext|>`` is
   bos/eos/unk/pad) on ``pretrain.txt`` with the ``tokenizers`` library;
3. pretrains a small ``GPT2LMHeadModel`` from a seeded random init on
   ``pretrain.txt`` (CPU);
4. saves model + tokenizer with ``save_pretrained`` to
   ``surgeon/assets/tiny-gpt2/`` (fp32 safetensors).

Options: ``--steps N`` (default 1000), ``--keep-corpus``, ``--out DIR``.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import math
import os
import random
import re
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "surgeon" / "assets"
CORPUS = ASSETS / "corpus"
MODEL_DIR = ASSETS / "tiny-gpt2"

SEED = 1234
EOT = "<|endoftext|>"

# Model / training defaults.
VOCAB_SIZE = 1536
N_LAYER = 4
N_EMBD = 128
N_HEAD = 4
N_POSITIONS = 256
SEQ_LEN = 256
BATCH = 16
LR = 3e-3
WARMUP = 60
WEIGHT_DECAY = 0.05
TRAIN_DROPOUT = 0.1

# Corpus size budget (bytes, UTF-8, incl. newlines).
PRETRAIN_BUDGET = 760_000
PRETRAIN_HELDOUT_EVERY = 25  # every 25th paragraph goes to pretrain_heldout.txt
FINETUNE_TRAIN_BYTES = 110_000
FINETUNE_HELDOUT_BYTES = 16_000


# --------------------------------------------------------------------------
# Pretraining corpus: prose paragraphs from the Python standard library.
# --------------------------------------------------------------------------

_ALLOWED = set(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ,.;:'\"()?!-"
)
_SKIP_DIRS = {
    "test", "tests", "site-packages", "turtledemo", "__pycache__",
    "lib-dynload", "encodings", "ensurepip", "idlelib", "lib2to3",
}
_TRANSLATE = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"',
                            "\u2013": "-", "\u2014": "-", "\u2026": "..."})


def _as_prose(block: str) -> str | None:
    """Return ``block`` joined into one line if it reads as an English paragraph."""
    lines = block.split("\n")
    if any(l.lstrip().startswith((">>>", "...", "$ ", "#", "|", "+-", "..", "* ", "- "))
           for l in lines):
        return None
    indents = [len(l) - len(l.lstrip()) for l in lines if l.strip()]
    if not indents or max(indents[1:] or [0]) > indents[0]:
        return None  # literal/code block or nested list
    text = re.sub(r"\s+", " ", " ".join(l.strip() for l in lines)).strip()
    text = text.translate(_TRANSLATE)
    words = text.split()
    if len(text) < 60 or len(text) > 1500 or len(words) < 10:
        return None
    if not text[0].isupper() or text[-1] not in ".!?":
        return None
    if sum(c not in _ALLOWED for c in text) > 0.02 * len(text):
        return None
    if sum(w.strip(",.;:'\"()?!").isalpha() for w in words) < 0.85 * len(words):
        return None
    return text


def stdlib_paragraphs() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs
                         if x not in _SKIP_DIRS and not x.startswith(("test", "config-")))
        files += [Path(d) / n for n in names
                  if n.endswith(".py") and not n.startswith("test") and n != "topics.py"]
    docs: list[str] = []
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc:
                    docs.append(doc)
    try:
        from pydoc_data.topics import topics
        docs += [topics[k] for k in sorted(topics)]
    except ImportError:
        pass
    seen, out = set(), []
    for doc in docs:
        for block in re.split(r"\n\s*\n", doc):
            p = _as_prose(block)
            if p and p not in seen:
                seen.add(p)
                out.append(p)
    return out


def build_pretrain(rng: random.Random) -> tuple[list[str], list[str]]:
    paras = stdlib_paragraphs()
    rng.shuffle(paras)
    kept, size = [], 0
    for p in paras:
        if size + len(p) + 1 > PRETRAIN_BUDGET:
            break
        kept.append(p)
        size += len(p) + 1
    heldout = kept[::PRETRAIN_HELDOUT_EVERY]
    train = [p for i, p in enumerate(kept) if i % PRETRAIN_HELDOUT_EVERY]
    return train, heldout


# --------------------------------------------------------------------------
# Fine-tuning corpus: ship's-log entries from a seeded template grammar.
# --------------------------------------------------------------------------

POINTS = ["north", "north by east", "north-north-east", "north-east by north",
          "north-east", "east-north-east", "east", "east by south",
          "east-south-east", "south-east", "south-south-east", "south",
          "south by west", "south-south-west", "south-west", "west-south-west",
          "west", "west by north", "west-north-west", "north-west",
          "north-north-west"]
BEAUFORT = ["calm", "light airs", "a light breeze", "a gentle breeze",
            "a moderate breeze", "a fresh breeze", "a strong breeze",
            "a near gale", "a gale", "a strong gale", "a whole gale"]
SEA_BY_FORCE = [["a glassy sea", "the sea like a mill pond"],
                ["a smooth sea", "a low swell"],
                ["a slight sea", "a low swell from the west"],
                ["a slight sea", "a moderate swell"],
                ["a moderate sea", "a long swell from the south-west"],
                ["a moderate sea", "a rough sea"],
                ["a rough sea", "a heavy swell"],
                ["a very rough sea", "a high cross sea"],
                ["a high sea", "heavy seas breaking over the bow"],
                ["a very high sea", "mountainous seas"],
                ["a very high sea", "the sea white with foam"]]
SKIES = ["a clear sky", "fair weather", "a cloudless sky", "scattered cloud",
         "a hazy sky", "low grey cloud", "a dull overcast", "passing showers",
         "steady rain", "drizzle and poor visibility", "thick fog",
         "patches of mist", "heavy squalls", "thunder in the west",
         "sleet and a bitter cold", "a red sky at dawn", "a fine starry night"]
SAILS = ["the mainsail", "the foresail", "the jib", "the flying jib",
         "the fore topsail", "the main topsail", "the topgallants",
         "the staysails", "the spanker", "the mizzen", "the royals",
         "the outer jib"]
SAIL_ACTIONS = ["set {sail}", "took in {sail}", "reefed {sail}",
                "double-reefed {sail}", "shook out the reef in {sail}",
                "furled {sail}", "handed {sail}", "trimmed {sail}",
                "bent on a new {sail_bare}"]
CREW_NAMES = ["Abel", "Barnes", "Carver", "Doyle", "Ellis", "Finch", "Grady",
              "Harlow", "Ives", "Jensen", "Keane", "Lund", "Morrow", "Nash",
              "Olsen", "Pryce", "Quill", "Reyes", "Stroud", "Tobin", "Vance",
              "Wade", "Yates"]
RANKS = ["the mate", "the second mate", "the bosun", "the carpenter",
         "the cook", "the sailmaker", "the cabin boy", "able seaman {name}",
         "ordinary seaman {name}", "{name}", "{name}", "the helmsman"]
CAPTAINS = ["Captain Hale", "Captain Merrow", "Captain Ashby", "Captain Locke",
            "Captain Penhallow", "Captain Rudd", "Captain Selwyn"]
SHIPS = ["the Albatross", "the Mary Ellen", "the Northern Star", "the Kestrel",
         "the Good Intent", "the Halcyon", "the Sea Lark"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July",
          "August", "September", "October", "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday",
            "Saturday", "Sunday"]
WATCHES = ["the morning watch", "the forenoon watch", "the afternoon watch",
           "the first dog watch", "the last dog watch", "the first watch",
           "the middle watch"]
SIGHTINGS = ["a pod of whales {rel}", "dolphins playing {rel}",
             "a school of flying fish", "an albatross following in our wake",
             "a sail {rel}", "a brig standing to the {point}",
             "a steamer's smoke on the horizon {rel}", "land birds about the rigging",
             "floating weed and driftwood", "an iceberg {rel}",
             "the loom of land {rel}", "the light on {cape}",
             "a whaler hove to {rel}", "a waterspout {rel}", "turtles in the water",
             "a great shoal of mackerel", "seals on the ice {rel}"]
RELATIVE = ["off the port bow", "off the starboard bow", "on the port beam",
            "on the starboard beam", "astern", "fine on the port bow",
            "broad on the starboard quarter", "two points off the bow",
            "to windward", "to leeward", "dead ahead"]
CAPES = ["Cape Wrath", "Cape Clear", "the Lizard", "Ushant", "Finisterre",
         "Cape Race", "the Fastnet", "Flamborough Head", "the Old Head"]
JOBS = ["scrubbed the decks", "holystoned the decks", "pumped the bilges",
        "tarred the standing rigging", "mended the torn {sail_bare}",
        "set up the backstays", "overhauled the running gear",
        "painted the bulwarks", "sounded the well and found {inches} inches",
        "aired the sails", "stowed the anchor cables", "cleaned the lamps",
        "repaired the pump leathers", "rove a new brace",
        "lashed down the spare spars", "caulked the seams about the hatch",
        "exercised the boat crews", "broke out fresh water from the hold"]
MISHAPS = ["{who} cut {pron} hand on a wire", "{who} down with a fever",
           "{who} fell from the ratlines and bruised {pron} ribs",
           "the galley stove smoking badly", "a sea came aboard and flooded the waist",
           "the fore topsail sheet parted", "the log line carried away",
           "a cask of bread found spoiled", "the water is running low",
           "the chronometer seems to be losing time",
           "rats got into the flour", "the compass light went out in the squall",
           "the jib halyard chafed through", "one of the boats stove in",
           "{who} and {who2} quarrelled over the watch bill"]
PROVISIONS = ["opened a cask of salt beef", "opened a fresh barrel of biscuit",
              "served out lime juice to all hands", "reduced the water ration to {quarts} quarts a man",
              "issued an extra tot of rum", "caught a tunny for the pot",
              "baked fresh bread in the galley", "killed the last of the hens",
              "served out dried peas and pork", "opened a keg of molasses"]
CLOSINGS = ["All well.", "All well on board.", "Crew in good spirits.",
            "Ship making little water.", "Ship tight and dry.",
            "Glass steady, hopes of fair weather.", "God grant us a fair wind.",
            "Hands tired but cheerful.", "Nothing further to report.",
            "Kept a sharp lookout all night.", "Lamps lit and burning bright."]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


class ShipLog:
    """Seeded template grammar for short ship's-log entries (one per line)."""

    def __init__(self, rng: random.Random):
        self.r = rng
        self.day = 1

    def pick(self, seq):
        return self.r.choice(seq)

    def person(self) -> str:
        return self.pick(RANKS).format(name=self.pick(CREW_NAMES))

    def date(self) -> str:
        r = self.r
        d = r.randint(1, 28)
        suffix = {1: "st", 2: "nd", 3: "rd", 21: "st", 22: "nd", 23: "rd"}.get(d, "th")
        forms = [f"Day {r.randint(1, 180)}",
                 f"{d}{suffix} {self.pick(MONTHS)}",
                 f"{self.pick(WEEKDAYS)}, {d}{suffix} of {self.pick(MONTHS)}",
                 f"{self.pick(MONTHS)} {d}",
                 f"{self.pick(WEEKDAYS)} {d} {self.pick(MONTHS)} 18{r.randint(40, 89)}"]
        return self.pick(forms)

    def time(self) -> str:
        r = self.r
        forms = [f"{r.randint(0, 23):02d}{self.pick(['00', '15', '30', '45'])}",
                 f"{r.randint(0, 23):02d}{self.pick(['00', '30'])} hours",
                 "noon", "midnight", "dawn", "sunset",
                 f"{self.pick(['one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight'])} bells in {self.pick(WATCHES)}"]
        return self.pick(forms)

    def weather(self) -> str:
        r = self.r
        force = min(10, max(0, int(r.gauss(4, 2.2))))
        point = self.pick(POINTS)
        sea = self.pick(SEA_BY_FORCE[force])
        sky = self.pick(SKIES)
        baro = f"{r.randint(28, 30)}.{r.randint(0, 99):02d}"
        trend = self.pick(["rising", "falling", "steady", "falling fast", "rising slowly"])
        if force == 0:
            wind = self.pick(["Calm.", "Flat calm.", "No wind."])
        else:
            wind = self.pick([f"Wind {point}, force {force}.",
                              f"Wind {point}, {BEAUFORT[force]}.",
                              f"{BEAUFORT[force][0].upper() + BEAUFORT[force][1:]} from the {point}.",
                              f"Wind backing to the {point}, force {force}.",
                              f"Wind veering {point}, {BEAUFORT[force]}."])
        parts = [wind, self.pick([f"{sea[0].upper() + sea[1:]}, {sky}.",
                                  f"{sky[0].upper() + sky[1:]} and {sea}.",
                                  f"{sea[0].upper() + sea[1:]}."])]
        if r.random() < 0.5:
            parts.append(self.pick([f"Barometer {baro} and {trend}.",
                                    f"Glass {trend} at {baro}."]))
        return " ".join(parts), force

    def position(self) -> str:
        r = self.r
        lat = f"{r.randint(0, 62)} {r.randint(0, 59):02d} {self.pick('NS')}"
        lon = f"{r.randint(0, 75):03d} {r.randint(0, 59):02d} {self.pick('EW')}"
        course = r.randint(0, 359)
        knots = r.randint(2, 11)
        return self.pick([
            f"Position by observation lat {lat}, long {lon}.",
            f"Noon position lat {lat}, long {lon}.",
            f"By dead reckoning lat {lat}, long {lon}.",
            f"Course {course:03d}, making {knots} knots.",
            f"Steering {self.pick(POINTS)}, {knots} knots by the log.",
            f"Run since noon yesterday {r.randint(40, 260)} miles.",
            f"Lat {lat}, long {lon}; course {course:03d}, {knots} knots.",
        ])

    def sails(self, force: int) -> str:
        sail = self.pick(SAILS)
        act = self.pick(SAIL_ACTIONS[:2] + SAIL_ACTIONS[4:] if force < 6 else SAIL_ACTIONS[1:6])
        text = act.format(sail=sail, sail_bare=sail[4:])
        if self.r.random() < 0.4:
            text += " and " + self.pick(SAIL_ACTIONS[:8]).format(sail=self.pick(SAILS), sail_bare="")
        return text[0].upper() + text[1:] + "."

    def event(self) -> str:
        r = self.r
        kind = r.random()
        if kind < 0.3:
            s = self.pick(SIGHTINGS).format(rel=self.pick(RELATIVE), point=self.pick(POINTS),
                                            cape=self.pick(CAPES))
            return self.pick(["Sighted ", "Saw ", "Lookout reported "]) + s + "."
        if kind < 0.55:
            job = self.pick(JOBS).format(sail_bare=self.pick(SAILS)[4:], inches=r.randint(2, 14))
            who = self.pick(["All hands ", "The watch ", "Hands ", "The starboard watch ",
                             "The port watch ", _cap(self.person()) + " "])
            return who + job + "."
        if kind < 0.8:
            m = self.pick(MISHAPS).format(who=self.person(), who2=self.person(), pron="his")
            return m[0].upper() + m[1:] + "."
        p = self.pick(PROVISIONS).format(quarts=r.randint(2, 4))
        return p[0].upper() + p[1:] + "."

    def entry(self) -> str:
        r = self.r
        head = f"{self.date()}, {self.time()}."
        if r.random() < 0.15:
            head = f"Aboard {self.pick(SHIPS)}, {head[0].lower() + head[1:]}" if head.startswith("Day") \
                else f"Aboard {self.pick(SHIPS)}, {head}"
        weather, force = self.weather()
        parts = [head, weather]
        if r.random() < 0.7:
            parts.append(self.position())
        if r.random() < 0.6:
            parts.append(self.sails(force))
        for _ in range(r.choice([1, 1, 2, 2, 3])):
            parts.append(self.event())
        if r.random() < 0.6:
            parts.append(self.pick(CLOSINGS))
        if r.random() < 0.4:
            parts.append(self.pick([f"Signed, {self.pick(CAPTAINS)}.",
                                    f"{self.pick(CAPTAINS)}, master.",
                                    f"Entered by {self.pick(['the mate', 'the second mate'])}."]))
        return " ".join(parts)


def build_finetune(rng: random.Random) -> tuple[list[str], list[str]]:
    gen = ShipLog(rng)
    seen: set[str] = set()
    train, heldout, tsize, hsize = [], [], 0, 0
    i = 0
    while tsize < FINETUNE_TRAIN_BYTES or hsize < FINETUNE_HELDOUT_BYTES:
        line = gen.entry()
        if line in seen:
            continue
        seen.add(line)
        i += 1
        if i % 8 == 0 and hsize < FINETUNE_HELDOUT_BYTES:
            heldout.append(line)
            hsize += len(line) + 1
        elif tsize < FINETUNE_TRAIN_BYTES:
            train.append(line)
            tsize += len(line) + 1
    return train, heldout


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_lines(path: Path) -> list[str]:
    return [l for l in path.read_text(encoding="utf-8").split("\n") if l.strip()]


# --------------------------------------------------------------------------
# Tokenizer, data, model.
# --------------------------------------------------------------------------

def train_tokenizer(lines: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT, eos_token=EOT, unk_token=EOT, pad_token=EOT,
        model_max_length=N_POSITIONS,
    )


def encode_stream(tokenizer, lines: list[str]):
    """One long token stream: each line followed by <|endoftext|>."""
    import torch

    eot = tokenizer.convert_tokens_to_ids(EOT)
    ids: list[int] = []
    for enc in tokenizer(lines, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


def heldout_loss(model, stream, seq_len: int = SEQ_LEN, batch: int = 16) -> float:
    """Mean next-token loss (nats/token) over non-overlapping windows."""
    import torch

    n = (len(stream) - 1) // seq_len
    x = stream[: n * seq_len].view(n, seq_len)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, n, batch):
            xb = x[i : i + batch]
            out = model(input_ids=xb, labels=xb)
            k = xb.numel() - xb.shape[0]
            total += out.loss.item() * k
            count += k
    return total / count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--keep-corpus", action="store_true",
                    help="train on the existing corpus files instead of regenerating them")
    ap.add_argument("--out", type=Path, default=MODEL_DIR)
    args = ap.parse_args()

    import torch
    import transformers
    from tqdm import tqdm
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    random.seed(SEED)
    torch.manual_seed(SEED)
    t0 = time.time()

    # 1. corpus ------------------------------------------------------------
    files = {n: CORPUS / f"{n}.txt" for n in
             ("pretrain", "pretrain_heldout", "finetune", "finetune_heldout")}
    if args.keep_corpus:
        text = {n: read_lines(p) for n, p in files.items()}
    else:
        pre_train, pre_held = build_pretrain(random.Random(SEED))
        ft_train, ft_held = build_finetune(random.Random(SEED + 1))
        text = {"pretrain": pre_train, "pretrain_heldout": pre_held,
                "finetune": ft_train, "finetune_heldout": ft_held}
        for n, p in files.items():
            write_lines(p, text[n])
    assert not set(text["finetune"]) & set(text["finetune_heldout"])
    assert not set(text["pretrain"]) & set(text["pretrain_heldout"])
    for n, p in files.items():
        data = p.read_bytes()
        print(f"{p.relative_to(REPO)}: {len(text[n])} lines, {len(data)} bytes, "
              f"sha256 {hashlib.sha256(data).hexdigest()[:16]}")

    # 2. tokenizer ---------------------------------------------------------
    tokenizer = train_tokenizer(text["pretrain"])
    streams = {n: encode_stream(tokenizer, lines) for n, lines in text.items()}
    for n, s in streams.items():
        print(f"  {n}: {len(s)} tokens")

    # 3. model -------------------------------------------------------------
    eot = tokenizer.convert_tokens_to_ids(EOT)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=N_POSITIONS, n_embd=N_EMBD,
        n_layer=N_LAYER, n_head=N_HEAD, bos_token_id=eot, eos_token_id=eot,
        pad_token_id=eot, resid_pdrop=TRAIN_DROPOUT, embd_pdrop=TRAIN_DROPOUT,
        attn_pdrop=TRAIN_DROPOUT, tie_word_embeddings=True,
    )
    torch.manual_seed(SEED)
    model = GPT2LMHeadModel(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: GPT2LMHeadModel n_layer={N_LAYER} n_embd={N_EMBD} n_head={N_HEAD} "
          f"n_positions={N_POSITIONS} vocab={config.vocab_size} params={n_params}")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < WARMUP:
            return LR * (step + 1) / WARMUP
        frac = (step - WARMUP) / max(1, args.steps - WARMUP)
        return LR * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))

    stream = streams["pretrain"]
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    t_train = time.time()
    bar = tqdm(range(args.steps), desc="pretrain", unit="step", dynamic_ncols=True)
    ema = None
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        starts = torch.randint(0, len(stream) - SEQ_LEN - 1, (BATCH,), generator=gen)
        xb = torch.stack([stream[s : s + SEQ_LEN] for s in starts.tolist()])
        loss = model(input_ids=xb, labels=xb).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr_at(step):.2e}")
    bar.close()
    train_s = time.time() - t_train

    # 4. save (dropout off in the shipped config: deterministic fine-tuning graphs)
    model.eval()
    for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout"):
        setattr(model.config, k, 0.0)
    model.generation_config.bos_token_id = eot
    model.generation_config.eos_token_id = eot
    model.generation_config.pad_token_id = eot
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    for f in args.out.iterdir():
        f.chmod(0o644)  # safetensors writes 0600; keep the shipped files world-readable

    # 5. report (reload from disk, as users will) ---------------------------
    reloaded = GPT2LMHeadModel.from_pretrained(args.out, dtype=torch.float32)
    reloaded.eval()
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"saved {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}"
          f" ({size / 1e6:.2f} MB): " + ", ".join(sorted(f.name for f in args.out.iterdir())))
    print(f"pretraining: {args.steps} steps x {BATCH} x {SEQ_LEN} tokens in {train_s:.0f}s")
    print(f"ln(vocab) = {math.log(config.vocab_size):.3f}")
    print(f"loss on pretrain.txt (train split, first 32k tokens): "
          f"{heldout_loss(reloaded, streams['pretrain'][:32768]):.3f} nats/token")
    for n in ("pretrain_heldout", "finetune_heldout"):
        print(f"held-out loss {n + '.txt':>21}: {heldout_loss(reloaded, streams[n]):.3f} nats/token")
    prompt = tokenizer("The function", return_tensors="pt")
    sample = reloaded.generate(**prompt, max_new_tokens=30, do_sample=False)
    print("sample:", repr(tokenizer.decode(sample[0])))
    print(f"total time {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
