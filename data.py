"""
Real image-caption data for data-aided SiD (`--data PATH`): a folder of captioned images, or `tiny`.

    data = open_data("my_images/", resolution=512, encode=teacher.encode, cache_dir="runs/sana/latents",
                     seed=0, rank=rank, world=world, barrier=dist.barrier)
    x_real, captions = data.draw(global_batch)   # this rank's slice: (global_batch / world, C, h, w), list of str
    ckpt["data"] = data.state_dict()             # resume: data.load_state_dict(ckpt["data"])

Folder layouts (the Hugging Face `imagefolder` convention):
  - metadata.jsonl at the folder's root, one JSON object per line: {"file_name": "sub/cat.png", "text": "a cat"};
    file_name is relative to the folder; an image may have several lines (several captions, e.g. COCO's five).
    Every image under the folder must be listed. Other keys are ignored.
  - or, with no metadata.jsonl: every image has a same-name caption file (cat.png + cat.txt).
  Images: .png .jpg .jpeg .webp .bmp .gif .tif .tiff, in subfolders too; names starting with "." are skipped.

Images are converted to RGB, resized so the shorter side is `resolution` and centre-cropped to a square,
then mapped to [-1, 1]: the official transform (SiD-DiT training/precompute_latents.py: torchvision
Resize(res) -> CenterCrop(res) -> ToTensor -> Normalize(0.5, 0.5)), written with PIL: torchvision's Resize
on a PIL image is PIL's BILINEAR filter (antialiased when shrinking: PIL widens the filter by the scale),
the longer side is int(res * long / short), the crop offset int(round((size - res) / 2)).

Each image is encoded ONCE by the caller's `encode(images)` (the teacher's VAE; a KL VAE that samples its
latent distribution gets a seeded generator in that closure: files are encoded in a fixed order, sorted by
path, rank r taking every world-th file, in batches of `encode_batch`). Latents live in `cache_dir` (the run
folder) as safetensors shards, each tensor named by a key of (path in the folder, byte size, mtime, resolution,
cache_tag): a resumed run finds them and encodes nothing, a changed file gets a new key and is re-encoded,
and reading a batch memory-maps only the latents it needs.

Order: one infinite global stream, the concatenation of per-epoch permutations randperm(n; seed, epoch); each
draw takes the next `global_batch` items at the global position and rank r keeps the r-th contiguous slice,
as train.py slices its noise draws. So ranks are disjoint, each epoch covers every item once, 1 rank and N
ranks see the same global batches, and resuming needs only the position (state_dict).
`tiny`: fresh images and prompts from the embedded teacher's world (tiny.py), rendered from a generator seeded
by (seed, position): infinite, and resumable the same way.

Bad input stops at setup with a one-line error naming the file: a missing or empty folder, an unreadable or
truncated image, an image with no caption. A caption longer than the text encoder takes is cut as the
teacher's pipeline cuts it, with one warning (the prompt encoders warn once).

Checked by: test_adversarial.py (`python -m pytest test_adversarial.py -q`).
"""

import hashlib
import json
import os
import sys
import uuid

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def open_data(spec, resolution, encode, cache_dir, seed=0, rank=0, world=1, barrier=None, cache_tag="",
              encode_batch=16):
    """`--data` -> a data source with draw(global_batch), state_dict(), load_state_dict(); see the module docstring.

    barrier: called once after this rank has encoded its share of the folder (torch.distributed.barrier when
    world > 1), so that every rank then finds every latent in the cache. cache_tag: names what `encode` is
    (e.g. the teacher and VAE sampling seed) so latents of another encoder in the same folder are not reused.
    """
    if spec == "tiny":
        import tiny
        if resolution != tiny.IMAGE_SIZE:
            raise ValueError(f"--data tiny renders {tiny.IMAGE_SIZE}x{tiny.IMAGE_SIZE} images, the run's resolution is "
                             f"{resolution}; use it with --teacher tiny, or pass a folder of images")
        return TinyData(encode, seed, rank, world)
    return FolderData(spec, resolution, encode, cache_dir, seed, rank, world, barrier, cache_tag, encode_batch)


# ----------------------------------------------------------------------------------------------
# Reading a folder


def read_folder(root):
    """[(image path relative to root, caption)], one per caption, from metadata.jsonl or same-name .txt files."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--data {root} is not a folder; pass a folder of captioned images or 'tiny'")
    images = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        images += [os.path.normpath(os.path.join(rel, f)).replace(os.sep, "/") for f in filenames
                   if f.lower().endswith(IMAGE_EXTS) and not f.startswith(".")]
    images.sort()
    if not images:
        raise ValueError(f"--data {root} holds no images ({' '.join(IMAGE_EXTS)}); add images with captions "
                         f"(a metadata.jsonl or a same-name .txt per image)")
    meta = os.path.join(root, "metadata.jsonl")
    if os.path.isfile(meta):
        return _read_metadata(root, meta, images)
    items = []
    for name in images:
        txt = os.path.splitext(os.path.join(root, name))[0] + ".txt"
        if not os.path.isfile(txt):
            raise ValueError(f"{os.path.join(root, name)} has no caption: no {os.path.basename(txt)} beside it and no "
                             f"metadata.jsonl in {root}; add one or remove the image")
        items.append((name, _read_caption(txt, os.path.join(root, name))))
    return items


def _read_caption(txt, image):
    try:
        with open(txt, encoding="utf-8") as f:
            caption = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the caption {txt}: {type(e).__name__}; save it as UTF-8 text") from None
    if not caption:
        raise ValueError(f"{image} has no caption: {txt} is empty; write its caption or remove the image")
    return caption


def _read_metadata(root, meta, images):
    known, items = set(images), []
    with open(meta, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{meta} line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{where} is not valid JSON; write one object per line, "
                                 f'{{"file_name": ..., "text": ...}}') from None
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
                raise ValueError(f'{where} has no "file_name"; write {{"file_name": ..., "text": ...}} per line')
            name = os.path.normpath(row["file_name"]).replace(os.sep, "/")
            if name not in known:
                raise FileNotFoundError(f"{where} names {name}, which is not an image in {root}; fix the name or "
                                        f"drop the line")
            text = row.get("text")
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f'{os.path.join(root, name)} has no caption: {where} has no "text"; add it')
            items.append((name, text.strip()))
    unlisted = sorted(known - {name for name, _ in items})
    if unlisted:
        raise ValueError(f"{os.path.join(root, unlisted[0])} has no caption: it is not in {meta} ({len(unlisted)} "
                         f"image(s) are not); add a line for each or remove them")
    return items


def load_image(path, resolution):
    """(3, resolution, resolution) float32 in [-1, 1]: RGB, shorter side resized (bilinear), centre crop."""
    try:
        with Image.open(path) as im:
            im.load()                      # decodes every pixel: a truncated file fails here, at setup
            im = im.convert("RGB")
    except Exception as e:                 # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise ValueError(f"cannot read image {path}: {type(e).__name__}: {' '.join(str(e).split())}; replace or "
                         f"remove it") from None
    w, h = im.size
    if w <= h:                             # torchvision Resize(int): the shorter side becomes `resolution`
        size = (resolution, int(resolution * h / w))
    else:
        size = (int(resolution * w / h), resolution)
    im = im.resize(size, Image.Resampling.BILINEAR)
    left, top = int(round((size[0] - resolution) / 2.0)), int(round((size[1] - resolution) / 2.0))
    im = im.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)   # (3, R, R) uint8
    return (x.float() / 255 - 0.5) / 0.5


# ----------------------------------------------------------------------------------------------
# The latent cache


def latent_key(root, name, resolution, tag=""):
    """Cache key of one image: its path in the folder, byte size, mtime (ns), the resolution and the encoder tag."""
    st = os.stat(os.path.join(root, name))
    return hashlib.sha1(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\0{resolution}\0{tag}".encode()).hexdigest()


class LatentCache:
    """Tensors in safetensors shards in one folder, each named by its key; shards are written to a temporary name and
    renamed, so a crash leaves whole shards only, and every rank writes its own. Image latents (fill) and prompt
    features (PromptCache) live in one."""

    def __init__(self, folder, prefix="latents"):
        self.folder, self.prefix = folder, prefix
        os.makedirs(folder, exist_ok=True)
        self.rescan()

    def rescan(self):
        self.index = {}
        for f in sorted(os.listdir(self.folder)):
            if f.endswith(".safetensors"):
                path = os.path.join(self.folder, f)
                try:
                    with safe_open(path, framework="pt") as s:
                        self.index.update(dict.fromkeys(s.keys(), path))
                except Exception as e:   # e.g. a disk that filled up; shards are only ever renamed into place whole
                    raise ValueError(f"cache shard {path} is unreadable ({type(e).__name__}); delete it (what it held "
                                     f"is encoded again)") from None

    def __contains__(self, key):
        return key in self.index

    def fill(self, todo, encode, resolution, batch=16, shard_size=256, rank=0):
        """Encode [(key, image path)] in order, `batch` images per encode call; a shard every `shard_size`."""
        pending = {}
        with tqdm(total=len(todo), desc="encoding images", disable=rank != 0 or not todo, unit="img",
                  file=sys.stdout) as bar:
            for i in range(0, len(todo), batch):
                chunk = todo[i:i + batch]
                images = torch.stack([load_image(path, resolution) for _, path in chunk])   # (b, 3, R, R)
                with torch.no_grad():
                    z = encode(images).float().cpu()                                        # (b, C, h, w)
                pending.update({key: zi.clone() for (key, _), zi in zip(chunk, z)})
                if len(pending) >= shard_size:
                    self.write(pending, rank)
                    pending = {}
                bar.update(len(chunk))
        if pending:
            self.write(pending, rank)

    def write(self, tensors, rank=0):
        """One new shard holding {key: tensor}."""
        path = os.path.join(self.folder, f"{self.prefix}-r{rank}-{uuid.uuid4().hex[:12]}.safetensors")
        save_file(tensors, path + ".tmp")
        os.replace(path + ".tmp", path)
        self.index.update(dict.fromkeys(tensors, path))

    def read(self, keys):
        """The tensors of `keys`, stacked (len(keys), ...), reading only those tensors."""
        out = [None] * len(keys)
        by_shard = {}
        for i, key in enumerate(keys):
            by_shard.setdefault(self.index[key], []).append(i)
        for path, idx in by_shard.items():
            with safe_open(path, framework="pt") as s:
                for i in idx:
                    out[i] = s.get_tensor(keys[i])
        return torch.stack(out)


class PromptCache:
    """Prompt features encoded once per run into a folder (the run's `prompt_cache/`), then read per batch.

    fill(texts, ...) encodes the texts not cached yet, rank r taking every world-th, in batches; get(texts) stacks
    their features on the CPU ({"text": (B, L, D), "text_mask"?, "pooled"?}). So host memory stays bounded however
    many prompts a run has (they live on disk, e.g. 1.3 MB per prompt for SD3 at 77 + 77 tokens in bf16), a resumed
    run encodes nothing, and the text encoders can leave the GPU once the run's texts are in. A key hashes the
    encoder tag (the teacher and its text length), whether the text is the CFG negative (SANA encodes "" differently
    then), and the text.
    """

    def __init__(self, folder, tag):
        self.store, self.tag = LatentCache(folder, prefix="prompts"), tag

    def key(self, text, negative=False):
        return hashlib.sha1(f"{self.tag}\0{int(negative)}\0{text}".encode()).hexdigest()

    def fill(self, texts, encode, rank=0, world=1, barrier=None, batch=64, negative=False):
        """Encode the missing texts (this rank's share) with encode(texts, negative) -> {field: (b, ...)}; returns
        the bytes one text's features take."""
        texts = list(dict.fromkeys(texts))
        # each rank's share is fixed before looking at the cache, as another rank may already be writing to it
        todo = [t for t in texts[rank::world] if f"{self.key(t, negative)}.text" not in self.store]
        for i in tqdm(range(0, len(todo), batch), desc="encoding prompts", disable=rank != 0 or not todo,
                      file=sys.stdout):
            chunk = todo[i:i + batch]
            with torch.no_grad():
                out = encode(chunk, negative)
            self.store.write({f"{self.key(t, negative)}.{field}": v[j].cpu().contiguous()
                              for field, v in out.items() for j, t in enumerate(chunk)}, rank)
        if barrier is not None:
            barrier()
        self.store.rescan()                              # the other ranks' shards
        one = self.get(texts[:1], negative)
        return sum(v.numel() * v.element_size() for v in one.values())

    def get(self, texts, negative=False):
        keys = [self.key(t, negative) for t in texts]
        if f"{keys[0]}.text" not in self.store:
            raise KeyError(f"prompt {texts[0][:60]!r} is not in the prompt cache {self.store.folder}; fill() it first")
        fields = [k.split(".", 1)[1] for k in self.store.index if k.startswith(keys[0] + ".")]
        return {field: self.store.read([f"{k}.{field}" for k in keys]) for field in sorted(fields)}


# ----------------------------------------------------------------------------------------------
# The order: one global stream of per-epoch permutations, sliced per rank


def mix_seed(*words):
    """One 32-bit generator seed from several integers (numpy's SeedSequence hash): torch's CPU generator keeps only
    32 bits of its seed, so seed * 2**32 + epoch would give every seed the same stream."""
    return int(np.random.SeedSequence(words).generate_state(1)[0])


class Order:
    """Items start .. start + count - 1 of perm_0 ++ perm_1 ++ ..., perm_e = randperm(n) seeded by mix_seed(seed, e)."""

    def __init__(self, n, seed):
        self.n, self.seed, self.epoch, self.perm = n, seed, None, None

    def permutation(self, epoch):
        if epoch != self.epoch:   # keep one epoch's permutation: draws walk through epochs in order
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            self.epoch, self.perm = epoch, torch.randperm(self.n, generator=g).tolist()
        return self.perm

    def take(self, start, count):
        out = []
        while len(out) < count:
            epoch, offset = divmod(start + len(out), self.n)
            out += self.permutation(epoch)[offset:offset + count - len(out)]
        return out


def rank_slice(items, rank, world):
    """This rank's contiguous share of a global batch (as train.py's `mine` slice of its noise draws)."""
    if len(items) % world:
        raise ValueError(f"a real-data batch of {len(items)} does not split over {world} ranks; use a multiple of "
                         f"{world}")
    m = len(items) // world
    return items[rank * m:(rank + 1) * m]


class FolderData:
    """A folder of captioned images, encoded once into the latent cache; see the module docstring."""

    def __init__(self, root, resolution, encode, cache_dir, seed=0, rank=0, world=1, barrier=None, cache_tag="",
                 encode_batch=16):
        self.root, self.rank, self.world = root, rank, world
        self.items = read_folder(root)                                     # [(name, caption)]
        files = sorted({name for name, _ in self.items})
        keys = {name: latent_key(root, name, resolution, cache_tag) for name in files}
        self.cache = LatentCache(cache_dir)
        todo = [(keys[f], os.path.join(root, f)) for f in files[rank::world] if keys[f] not in self.cache]
        self.cache.fill(todo, encode, resolution, encode_batch, rank=rank)
        if barrier is not None:
            barrier()
        self.cache.rescan()                                                # the other ranks' shards
        missing = [f for f in files if keys[f] not in self.cache]
        if missing:
            raise ValueError(f"{os.path.join(root, missing[0])} has no latent in {cache_dir} after encoding "
                             f"({len(missing)} missing); with several ranks pass barrier=, else clear {cache_dir}")
        self.keys = [keys[name] for name, _ in self.items]
        self.fingerprint = hashlib.sha1("\0".join(k + c for k, (_, c) in zip(self.keys, self.items)).encode()).hexdigest()
        self.order, self.position = Order(len(self.items), seed), 0
        self.captions = sorted({caption for _, caption in self.items})    # what the prompt cache must hold

    def __len__(self):
        return len(self.items)

    def draw(self, global_batch):
        """The next global batch, this rank's slice: latents (global_batch / world, C, h, w) fp32 CPU, captions."""
        idx = rank_slice(self.order.take(self.position, global_batch), self.rank, self.world)
        self.position += global_batch
        return self.cache.read([self.keys[i] for i in idx]), [self.items[i][1] for i in idx]

    def state_dict(self):
        return {"position": self.position, "fingerprint": self.fingerprint}

    def load_state_dict(self, state):
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(f"--data {self.root} changed since the checkpoint (files, captions or their order); "
                             f"restore it to resume, or start a new run")
        self.position = state["position"]


class TinyData:
    """Fresh images and prompts from the tiny teacher's world, an infinite stream: item n of the stream is drawn
    from a generator seeded by (seed, n), so any split over ranks and rounds sees the same items."""

    def __init__(self, encode, seed=0, rank=0, world=1):
        import tiny
        self.encode, self.seed, self.rank, self.world, self.position = encode, seed, rank, world, 0
        self.captions = list(tiny.ALL_PROMPTS)                             # every caption the stream can draw

    def draw(self, global_batch):
        import tiny
        mine = rank_slice(list(range(self.position, self.position + global_batch)), self.rank, self.world)
        self.position += global_batch
        prompts, images = [], []
        for n in mine:
            g = torch.Generator().manual_seed(mix_seed(self.seed, n))
            prompts += tiny.sample_prompts(1, g)
            images.append(tiny.render(prompts[-1:], g))                    # (1, 3, 32, 32)
        with torch.no_grad():
            z = self.encode(torch.cat(images)).float().cpu()
        return z, prompts

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]
