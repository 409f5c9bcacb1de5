"""`AAEModel`: an exported encoder/decoder pair loaded once, scoring arrays or image files.

This is the API a device embeds; the `aae-run` CLI is a thin layer over it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from aae_runtime.calibration import normalise, threshold_at_percentile
from aae_runtime.contract.errors import InputError, ModelError
from aae_runtime.images import find_images, load_image
from aae_runtime.contract.metadata import (
    CLASS_OUTPUT,
    DECODER_FILE,
    ENCODER_FILE,
    IMAGE_INPUT,
    LABEL_INPUT,
    LATENT_INPUT,
    LATENT_OUTPUT,
    METADATA_KEY,
    PIXEL_ERROR_OUTPUT,
    RECONSTRUCTION_ERROR_OUTPUT,
    RECONSTRUCTION_OUTPUT,
    SCORER_FILE,
    ModelMetadata,
)
from aae_runtime.contract.priors import sample_prior
from aae_runtime.contract.scores import (
    HEAD_PARAMS, HEAD_THRESHOLD, SEGMENTATION, ScoreParts, evaluate_score, head_params, intensity, per_image, pixel_error,
)
from aae_runtime.contract.modelfolder import current_version
from aae_runtime.contract.onnxwire import check_operators, read_graph_file
from aae_runtime.session import SessionConfig, create_session

DEFAULT_BATCH_SIZE = 64
# Folder scoring: batches decoded ahead of inference, and threads decoding them. Two batches
# ahead ride out a slow file. Pillow releases the GIL while it decompresses and resizes, so
# large camera images decode on every core but the one that runs inference; small images are
# bound by Python (the GIL) and more threads only contend (measured on 2 busy cores: 28 px
# PNGs 7,100/s with one decode thread, 5,300/s with two; `aae-run bench` reports the overlap).
DECODE_AHEAD = 2
DECODE_WORKERS = max(1, min(4, (os.cpu_count() or 1) - 1))
# Inference threads when image files are scored (`aae-run score`, `classify`): the cores the
# decoding threads leave. With ONNX Runtime on every core the decoders wait for a core and the
# overlap is lost: on the 2-core box, 28 px PNGs, 512 files, score_paths ran 10,400/s with two
# inference threads (overlap speed-up 0.94x) and 12,100/s with one (1.24x), side by side. A tiled
# model is inference-bound (one photo decodes while its many tiles run), so it keeps every core.
FILE_SCORING_THREADS = max(1, (os.cpu_count() or 1) - DECODE_WORKERS)


def file_scoring_threads(tiled: bool) -> int:
    """Intra-op threads for scoring files (0: ONNX Runtime's default, one per physical core)."""
    return 0 if tiled else FILE_SCORING_THREADS


@dataclass(frozen=True)
class ImageScore:
    """One row of a scoring run: a score and a flag, or the reason the file could not be scored."""

    path: str
    score: float | None = None  # raw score, in the units of the model's score
    anomaly: bool | None = None
    error: str | None = None
    normalized_score: float | None = None  # 0.5 at the threshold, clamped to [0, 1] (see calibration.py)
    # Per-pixel error (H, W) and the model input (C, H, W): only when asked for (anomaly maps).
    # A tiled model's: the photo's smoothed map (the one its score and regions come from) and the photo.
    pixel_error: np.ndarray | None = field(default=None, repr=False, compare=False)
    image: np.ndarray | None = field(default=None, repr=False, compare=False)
    # Class probabilities (K,) in the model's class order: only when classifying (`classify_paths`).
    probabilities: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None


class AAEModel:
    """An exported AAE: ``encoder.onnx`` + ``decoder.onnx`` (+ the fused ``scorer.onnx`` when
    exported) and the metadata they carry.

    The threshold is, in order of precedence: ``threshold`` (a value), ``threshold_percentile``
    (a percentile of the normal scores stored at calibration), the metadata's threshold.
    """

    def __init__(self, encoder, decoder, metadata: ModelMetadata, threshold: float | None = None, notice: str | None = None,
                 scorer=None, threshold_percentile: float | None = None):
        # onnxruntime.InferenceSession each, or a function that creates it on first use (`load`)
        self._encoder, self._decoder = encoder, decoder
        self.scorer = scorer  # fused image -> (latent, pixel_error, reconstruction_error) graph, or None
        self.metadata = metadata
        if threshold is not None:
            self.threshold, self.threshold_source = float(threshold), "given value"
        elif threshold_percentile is not None:
            self.threshold = threshold_at_percentile(metadata.threshold, threshold_percentile)
            self.threshold_source = f"{threshold_percentile:g}th percentile of the stored normal scores"
        else:
            self.threshold, self.threshold_source = metadata.threshold_value, _describe(metadata.threshold)
        self.notice = notice  # set when the requested device fell back to another
        self.tiling = metadata.tiling  # not None: whole photos are tiled at their own resolution, never resized

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "auto", threshold: float | None = None,
             session_config: SessionConfig | None = None, threshold_percentile: float | None = None,
             use_scorer: bool = True) -> "AAEModel":
        """Load the model folder written by ``aae-export`` (its current version: see
        aae_runtime.contract.modelfolder). Raises ModelError or DeviceError."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            what = "is a file, not a model folder" if model_dir.exists() else "does not exist"
            raise ModelError(f"model directory {model_dir} {what}: pass the folder aae-export wrote (--model DIR)")
        model_dir = current_version(model_dir)  # read once: a writer switching versions meanwhile is not mixed in
        paths = {name: model_dir / name for name in (ENCODER_FILE, DECODER_FILE)}
        for name, path in paths.items():
            if not path.is_file():
                raise ModelError(f"{model_dir} has no {name}: pass the folder aae-export wrote, or export again")
            if path.stat().st_size == 0:
                raise ModelError(f"{path} is empty: export the model again")
        cfg = session_config or SessionConfig(device=device)
        # Every graph is checked from its file (metadata, inputs, outputs: aae_runtime.contract.onnxwire,
        # well under a millisecond); a session (~12 ms each) is created only for the graphs a
        # command runs: the scorer (or the encoder) now, the others on first use.
        files = {name: read_graph_file(path) for name, path in paths.items()}
        for wire in files.values():
            check_operators(wire)
        meta_enc = ModelMetadata.from_json(files[ENCODER_FILE].custom_metadata_map.get(METADATA_KEY), ENCODER_FILE)
        meta_dec = ModelMetadata.from_json(files[DECODER_FILE].custom_metadata_map.get(METADATA_KEY), DECODER_FILE)
        if meta_enc.export_id != meta_dec.export_id:
            raise ModelError(
                f"{ENCODER_FILE} and {DECODER_FILE} in {model_dir} come from different exports: export both into one folder again"
            )
        _check_same_calibration(meta_enc, meta_dec, DECODER_FILE, model_dir)
        _check_graphs(files[ENCODER_FILE], files[DECODER_FILE], meta_enc)
        scorer = notice = None
        if use_scorer and (model_dir / SCORER_FILE).is_file() and (meta_enc.schema_version == 1 or "scorer" in meta_enc.graphs):
            wire = read_graph_file(model_dir / SCORER_FILE, initializers=frozenset({HEAD_PARAMS, HEAD_THRESHOLD}))
            check_operators(wire)
            meta_sc = ModelMetadata.from_json(wire.custom_metadata_map.get(METADATA_KEY), SCORER_FILE)
            if meta_sc.export_id != meta_enc.export_id:
                raise ModelError(f"{SCORER_FILE} in {model_dir} comes from another export than {ENCODER_FILE}: export again")
            _check_same_calibration(meta_enc, meta_sc, SCORER_FILE, model_dir)
            _check_scorer(wire, meta_enc)
            _check_score_head(wire, meta_enc)
            scorer, notice = create_session(model_dir / SCORER_FILE, cfg)
            _check_scorer(scorer, meta_enc)  # what ONNX Runtime reads must be what the file says
        encoder = decoder = None
        if scorer is None and SEGMENTATION in meta_enc.requires:
            raise ModelError(f"{model_dir}: this model's maps come from its segmenter, which only {SCORER_FILE} runs"
                             + ("" if (model_dir / SCORER_FILE).is_file() else f", and {SCORER_FILE} is missing: export the model again"))
        if scorer is None:  # the two graphs score: both now, so a long-running reader never opens a file later
            encoder, notice = create_session(paths[ENCODER_FILE], cfg)  # that a writer may have pruned since
            _check_graphs(encoder, files[DECODER_FILE], meta_enc)
            decoder = _session_as_read(paths[DECODER_FILE], cfg, files[DECODER_FILE], meta_enc)

        def later(path):
            return lambda: _session_as_read(path, cfg, files[path.name], meta_enc)

        return cls(encoder or later(paths[ENCODER_FILE]), decoder or later(paths[DECODER_FILE]), meta_enc, threshold=threshold,
                   notice=notice, scorer=scorer, threshold_percentile=threshold_percentile)

    @property
    def encoder(self):
        """The encoder's ONNX Runtime session (created on first use)."""
        if callable(self._encoder):
            self._encoder = self._encoder()
        return self._encoder

    @property
    def decoder(self):
        """The decoder's ONNX Runtime session (created on first use)."""
        if callable(self._decoder):
            self._decoder = self._decoder()
        return self._decoder

    # -- properties -------------------------------------------------------------------------------
    @property
    def providers(self) -> list[str]:
        """Execution providers actually running, in priority order (read back from ORT)."""
        return list((self.scorer or self.encoder).get_providers())

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.metadata.preprocessing.shape

    @property
    def score_name(self) -> str:
        return str(self.metadata.score["name"])

    @property
    def map_threshold(self) -> float:
        """Where a map's regions begin: a tiled model's image threshold (a photo is flagged exactly
        when its map has a region); else the normal per-pixel error's 99.9th percentile (the maps'
        colour scale, `pixel_error_scale`: pixels rarer than 1 in 1,000 normal ones)."""
        if self.tiling is not None:
            return self.threshold
        return float(self.metadata.score.get("pixel_error_scale", 1.0))

    @property
    def pixel_error_name(self) -> str:
        """The per-pixel error (mse, mae, bce) behind the score's reconstruction term and the maps."""
        return str(self.metadata.score.get("pixel_error", self.score_name))

    # -- arrays -----------------------------------------------------------------------------------
    @property
    def classes(self) -> tuple[str, ...] | None:
        """The class values of a conditional or classifying model, in label order; None otherwise."""
        return self.metadata.classes

    def encode(self, images: np.ndarray) -> np.ndarray:
        """Images (N, C, H, W) float32 in the model's value range -> latent codes (N, latent)."""
        return self.encoder.run([LATENT_OUTPUT], {IMAGE_INPUT: self._check_images(images)})[0]

    def class_probabilities(self, images: np.ndarray) -> np.ndarray:
        """Images (N, C, H, W) -> class probabilities (N, K), K = len(classes); needs a class head."""
        self._require_class_head()
        return self.encoder.run([CLASS_OUTPUT], {IMAGE_INPUT: self._check_images(images)})[0]

    def _require_class_head(self) -> None:
        if not self.metadata.classifies:
            raise InputError("this model has no class head (its encoder gives no class probabilities): "
                             "classify with a model trained with --family semi")

    def label_vectors(self, labels) -> np.ndarray:
        """Class values (e.g. "7", or 7) -> one-hot rows (N, K) for the decoder's label input."""
        names = self.classes or ()
        index = {c: i for i, c in enumerate(names)}
        rows = np.zeros((len(labels), len(names)), dtype=np.float32)
        for n, label in enumerate(labels):
            if str(label) not in index:
                raise InputError(f"label {label!r} is not a class of this model; its classes are {', '.join(names)}")
            rows[n, index[str(label)]] = 1.0
        return rows

    def decode(self, latents: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        """Latent codes (N, latent) -> images (N, C, H, W). A conditional decoder also takes
        ``labels``: (N, K) one-hot rows or class probabilities (see `label_vectors`)."""
        z = np.ascontiguousarray(latents, dtype=np.float32)
        if z.ndim != 2 or z.shape[1] != self.metadata.latent_dim:
            raise InputError(f"latents must have shape (N, {self.metadata.latent_dim}), got {z.shape}")
        feeds = {LATENT_INPUT: z}
        if self.metadata.conditional:
            if labels is None:
                raise InputError(f"this model's decoder needs a label beside the code (classes: {', '.join(self.classes)})")
            y = np.ascontiguousarray(labels, dtype=np.float32)
            if y.shape != (len(z), len(self.classes)):
                raise InputError(f"labels must have shape ({len(z)}, {len(self.classes)}), got {y.shape}")
            feeds[LABEL_INPUT] = y
        return self.decoder.run([RECONSTRUCTION_OUTPUT], feeds)[0]

    def decoder_labels(self, images: np.ndarray) -> np.ndarray | None:
        """The label rows a conditional decoder gets when these images are scored: the class
        head's probabilities, or the one-hot label that reconstructs each image best (None for an
        unconditional decoder)."""
        return self._decoder_inputs(self._check_images(images))[1]

    def reconstruct(self, images: np.ndarray) -> np.ndarray:
        """Reconstructions as the score sees them (a conditional decoder: see `decoder_labels`)."""
        return self.decode(*self._decoder_inputs(self._check_images(images)))

    def _decoder_inputs(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(codes, label rows or None) that the decoder reconstructs checked images from."""
        z, probs = self._codes(x)
        if probs is None and self.metadata.conditional:
            return z, self.label_vectors([self.classes[i] for i in self._best_labels(x, z)[0]])
        return z, probs

    def score_parts(self, images: np.ndarray) -> ScoreParts:
        """Latent codes, per-pixel error maps and mean errors of preprocessed images (N, C, H, W).

        One ONNX Runtime call through the fused scorer graph when the model has one, else the
        encoder and decoder with the error computed in numpy; both give the same numbers. A
        conditional decoder without a class head scores each image with the label that
        reconstructs it best (every label is tried); with a class head, with its probabilities.
        """
        x = self._check_images(images)
        pre = self.metadata.preprocessing
        ink = intensity(x, *pre.pixel_range)
        if self.scorer is not None:
            names = [LATENT_OUTPUT, PIXEL_ERROR_OUTPUT, RECONSTRUCTION_ERROR_OUTPUT] + ([CLASS_OUTPUT] if self.metadata.classifies else [])
            z, err, recon, *probs = self.scorer.run(names, {IMAGE_INPUT: x})
            return ScoreParts(z, err, recon.astype(np.float64), ink, probs[0] if probs else None)
        z, probs = self._codes(x)
        if probs is None and self.metadata.conditional:
            _, err = self._best_labels(x, z)
        else:
            err = pixel_error(x, self.decode(z, probs), self.pixel_error_name)
        return ScoreParts(z, err, per_image(err), ink, probs)

    def _codes(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(latent codes, class probabilities or None) of checked images."""
        if self.metadata.classifies:
            z, probs = self.encoder.run([LATENT_OUTPUT, CLASS_OUTPUT], {IMAGE_INPUT: x})
            return z, probs
        return self.encoder.run([LATENT_OUTPUT], {IMAGE_INPUT: x})[0], None

    def _best_labels(self, x: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index of the best label (N,), its per-pixel error maps (N, H, W)) of a conditional decoder."""
        k = len(self.classes)
        errors = np.stack([pixel_error(x, self.decode(z, np.repeat(np.eye(k, dtype=np.float32)[c : c + 1], len(z), 0)),
                                       self.pixel_error_name) for c in range(k)], axis=1)  # (N, K, H, W)
        best = per_image(errors.reshape(len(z) * k, *errors.shape[2:])).reshape(len(z), k).argmin(axis=1)
        return best, errors[np.arange(len(z)), best]

    def classify(self, images: np.ndarray) -> tuple[list[str], np.ndarray]:
        """(class value per image, class probabilities (N, K)) of preprocessed images; needs a class head."""
        probs = self.class_probabilities(images)
        return [self.classes[i] for i in probs.argmax(axis=1)], probs

    def score_photo(self, photo: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE,
                    progress: Callable[[int, int], None] | None = None) -> tuple[float, np.ndarray]:
        """(image score, map (H, W) float32) of one whole photo (C, H, W) at its own resolution, by a
        tiled model: tiles ``batch_size`` at a time (aae_runtime.contract.tiling); ``progress(done,
        of)`` hears of each batch of tiles."""
        if self.tiling is None:
            raise InputError("this model was not trained on crops, so it scores images resized to its input, not tiled photos")
        x = np.ascontiguousarray(photo, dtype=np.float32)
        if x.ndim != 3 or x.shape[0] != self.input_shape[0]:
            raise InputError(f"a photo must have shape ({self.input_shape[0]}, H, W), got {x.shape}")
        smoothed = self.tiling.smooth(self.tiling.stitch(x, lambda t: self.score_parts(t).pixel_error, batch_size, progress))
        return self.tiling.score_of(smoothed), smoothed

    def score(self, images: np.ndarray) -> np.ndarray:
        """Anomaly scores (N,) float64 of preprocessed images (N, C, H, W); higher = more abnormal.
        (A tiled model's whole photos: `score_photo`; here each input-sized image is one tile.)"""
        return self.score_from_parts(self.score_parts(images))

    def with_score(self, score: dict) -> "AAEModel":
        """This model with another score block (same sessions); the fused graph is kept only
        when it computes the pixel error the new score needs."""
        meta = ModelMetadata.from_dict(dict(self.metadata.raw, score=score), "score")
        same_pixels = score.get("pixel_error", score.get("name")) == self.pixel_error_name
        return AAEModel(self._encoder, self._decoder, meta, threshold=self.threshold, notice=self.notice,
                        scorer=self.scorer if same_pixels else None)

    def score_from_parts(self, parts: ScoreParts) -> np.ndarray:
        return evaluate_score(self.metadata.score, parts, self.metadata.prior)

    def normalise(self, scores: np.ndarray) -> np.ndarray:
        """Scores in [0, 1], 0.5 at the threshold (formula: aae_runtime.calibration)."""
        return normalise(scores, self.threshold, self.metadata.threshold.get("stats"))

    def is_anomaly(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.threshold

    def sample(self, n: int, seed: int | None = None, label: str | int | None = None) -> np.ndarray:
        """Decode ``n`` draws from the prior: images (n, C, H, W). A conditional model draws
        images of class ``label`` (a class value, e.g. "7"), or of random classes without one."""
        if n < 1:
            raise InputError(f"number of samples must be at least 1, got {n}")
        if label is not None and not self.metadata.conditional:
            raise InputError("--label: this model's decoder takes no label (train with --family supervised or semi)")
        rng = np.random.default_rng(seed)
        z = sample_prior(self.metadata.prior, n, rng)
        if not self.metadata.conditional:
            return self.decode(z)
        labels = [label] * n if label is not None else [self.classes[i] for i in rng.integers(0, len(self.classes), n)]
        return self.decode(z, self.label_vectors(labels))

    def sample_grid(self, rows: int, seed: int | None = None) -> np.ndarray:
        """The paper's figure for a conditional model: ``rows`` style codes, each decoded under
        every label in class order: images (rows * K, C, H, W), row-major."""
        if not self.metadata.conditional:
            raise InputError("--grid: this model's decoder takes no label, so there is no label axis to draw")
        if rows < 1:
            raise InputError(f"number of rows must be at least 1, got {rows}")
        k = len(self.classes)
        z = np.repeat(sample_prior(self.metadata.prior, rows, np.random.default_rng(seed)), k, axis=0)
        return self.decode(z, np.tile(np.eye(k, dtype=np.float32), (rows, 1)))

    # -- files ------------------------------------------------------------------------------------
    def load_images(self, paths: Iterable[str | Path]) -> list[np.ndarray | InputError]:
        pre = self.metadata.preprocessing
        out: list[np.ndarray | InputError] = []
        for p in paths:
            try:
                out.append(load_image(p, pre, native=self.tiling is not None))
            except InputError as exc:
                out.append(exc)
        return out

    def score_paths(self, paths: Iterable[str | Path], batch_size: int = DEFAULT_BATCH_SIZE) -> list[ImageScore]:
        """Score image files and folders (recursively). Unreadable files get an error row."""
        return list(self.iter_score_paths(paths, batch_size))

    def classify_paths(self, paths: Iterable[str | Path], batch_size: int = DEFAULT_BATCH_SIZE) -> list[ImageScore]:
        """Classify and score image files and folders: rows carry ``probabilities`` besides the
        score. Needs a class head (a semi-supervised model)."""
        self._require_class_head()
        return list(self.iter_score_paths(paths, batch_size, classify=True))

    def iter_score_paths(self, paths: Iterable[str | Path], batch_size: int = DEFAULT_BATCH_SIZE,
                         maps: bool = False, classify: bool = False,
                         on_tiles: Callable[[str, int, int], None] | None = None) -> Iterator[ImageScore]:
        """Like `score_paths`, yielding rows batch by batch; decoding of the next batch overlaps
        inference on the current one. With ``maps``, rows carry the per-pixel error and the input;
        with ``classify``, the class probabilities. A tiled model scores one photo at a time,
        ``batch_size`` tiles per inference call, and tells ``on_tiles(path, done, of)`` of each."""
        files = find_images(list(paths))
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        per_chunk = 1 if self.tiling is not None else batch_size
        chunks = [files[i : i + per_chunk] for i in range(0, len(files), per_chunk)]
        if len(chunks) <= 1:  # nothing to overlap: no thread pool to start (cold start of one image)
            for chunk in chunks:
                yield from self._score_decoded(chunk, self.load_images(chunk), maps, classify, batch_size, on_tiles)
            return
        from concurrent.futures import ThreadPoolExecutor  # folders only

        # DECODE_AHEAD batches decode while one is inferred; each batch is split over the workers
        # (Pillow releases the GIL while it decompresses, ONNX Runtime while it runs).
        with ThreadPoolExecutor(max_workers=DECODE_WORKERS) as pool:
            def submit(chunk):
                step = -(-len(chunk) // DECODE_WORKERS)
                return [pool.submit(self.load_images, chunk[j : j + step]) for j in range(0, len(chunk), step)]

            ahead = [submit(c) for c in chunks[:DECODE_AHEAD]]
            for i, chunk in enumerate(chunks):
                futures = ahead.pop(0)
                if i + DECODE_AHEAD < len(chunks):
                    ahead.append(submit(chunks[i + DECODE_AHEAD]))
                decoded = [item for f in futures for item in f.result()]
                yield from self._score_decoded(chunk, decoded, maps, classify, batch_size, on_tiles)

    def _score_decoded(self, chunk: list[Path], decoded: list, maps: bool = False, classify: bool = False,
                       batch_size: int = DEFAULT_BATCH_SIZE, on_tiles=None) -> Iterator[ImageScore]:
        if self.tiling is not None:
            yield from self._score_photos(chunk, decoded, maps, batch_size, on_tiles)
            return
        good = [k for k, item in enumerate(decoded) if isinstance(item, np.ndarray)]
        if good:
            parts = self.score_parts(np.stack([decoded[k] for k in good]))
            scores = self.score_from_parts(parts)
            normalised = self.normalise(scores)
        row = {k: j for j, k in enumerate(good)}
        for k, path in enumerate(chunk):
            if k in row:
                j = row[k]
                s = float(scores[j])
                yield ImageScore(str(path), score=s, anomaly=bool(s > self.threshold), normalized_score=float(normalised[j]),
                                 pixel_error=parts.pixel_error[j] if maps else None, image=decoded[k] if maps else None,
                                 probabilities=parts.class_probs[j] if classify else None)
            else:
                yield ImageScore(str(path), error=str(decoded[k]))

    def _score_photos(self, chunk: list[Path], decoded: list, maps: bool, batch_size: int,
                      on_tiles: Callable[[str, int, int], None] | None = None) -> Iterator[ImageScore]:
        """Rows of whole photos scored by tiling; a photo that cannot be tiled gets an error row."""
        for path, photo in zip(chunk, decoded):
            if not isinstance(photo, np.ndarray):
                yield ImageScore(str(path), error=str(photo))
                continue
            try:
                progress = (lambda done, of, name=str(path): on_tiles(name, done, of)) if on_tiles is not None else None
                s, smoothed = self.score_photo(photo, batch_size, progress)
            except InputError as exc:  # e.g. a photo smaller than one tile
                yield ImageScore(str(path), error=str(exc))
                continue
            if not np.isfinite(s):  # a broken model must not pass photos as normal
                yield ImageScore(str(path), error="the model gave non-finite errors on this photo: re-export the model")
                continue
            yield ImageScore(str(path), score=s, anomaly=bool(s > self.threshold), normalized_score=float(self.normalise(np.array([s]))[0]),
                             pixel_error=smoothed if maps else None, image=photo if maps else None)

    def _check_images(self, images: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(images, dtype=np.float32)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise InputError(f"images must have shape (N, {', '.join(map(str, self.input_shape))}), got {x.shape}")
        return x


def _describe(threshold: dict) -> str:
    method = threshold.get("method", "stored")
    if method == "percentile" and "percentile" in threshold:
        return f"{float(threshold['percentile']):g}th percentile of normal scores (metadata)"
    if method == "f1":
        return "F1-optimal on labelled images (metadata)"
    return f"{method} (metadata)"


def _session_as_read(path: Path, cfg: SessionConfig, wire, meta: ModelMetadata):
    """The session of a graph checked from its file at load: what ONNX Runtime reads must be
    what the file said (a file replaced since load is refused, not mixed in)."""
    if not path.is_file():  # its version pruned by writers since: two newer ones exist
        raise ModelError(f"{path} is gone: the model folder was updated since this model was loaded (a new export or "
                         "calibration): load the model again (restart the command)")
    session, _ = create_session(path, cfg)
    same = ([(a.name, a.shape) for a in session.get_inputs()] == [(a.name, a.shape) for a in wire.inputs]
            and session.get_modelmeta().custom_metadata_map.get(METADATA_KEY) == wire.custom_metadata_map.get(METADATA_KEY))
    if not same:
        raise ModelError(f"{path} changed since the model was loaded (a new export or calibration?): load the model again")
    return session


def _check_same_calibration(first: ModelMetadata, other: ModelMetadata, name: str, model_dir: Path) -> None:
    """Recalibration rewrites every graph's metadata; a difference means it was interrupted."""
    if first.raw != other.raw:
        raise ModelError(f"{ENCODER_FILE} and {name} in {model_dir} carry different metadata (an interrupted "
                         "recalibration?): run aae-run calibrate again, or export again")


def _check_scorer(scorer, meta: ModelMetadata) -> None:
    outputs = {o.name for o in scorer.get_outputs()}
    needed = {LATENT_OUTPUT, PIXEL_ERROR_OUTPUT, RECONSTRUCTION_ERROR_OUTPUT} | set((meta.graphs.get("scorer") or {}).get("outputs", []))
    needed |= {CLASS_OUTPUT} if meta.classifies else set()  # score_parts reads the class head from the same call
    if {i.name for i in scorer.get_inputs()} - {HEAD_THRESHOLD} != {IMAGE_INPUT} or not needed <= outputs:
        raise ModelError(f"{SCORER_FILE} lacks the '{IMAGE_INPUT}' input or its outputs {sorted(needed)}: re-export the model")
    fused = (meta.raw.get("graphs") or {}).get("scorer") or {}
    if fused.get("pixel_error") not in (None, meta.score.get("pixel_error", meta.score.get("name"))):
        raise ModelError(f"{SCORER_FILE} computes {fused.get('pixel_error')} errors but the score needs "
                         f"{meta.score.get('pixel_error')}: export again with the score you want")


def _check_score_head(wire, meta: ModelMetadata) -> None:
    """A fused graph that computes the score must hold the statistics and threshold its
    metadata names (calibrate rewrites both together)."""
    if "score_head" not in (meta.graphs.get("scorer") or {}):
        return
    expected = head_params(meta.score)
    params = np.frombuffer(wire.initializers.get(HEAD_PARAMS, b""), dtype="<f4")
    threshold = np.frombuffer(wire.initializers.get(HEAD_THRESHOLD, b""), dtype="<f4")
    if expected is None or params.shape != expected.shape or not np.array_equal(params, expected) \
            or threshold.shape != (1,) or threshold[0] != np.float32(meta.threshold_value):
        raise ModelError(f"{SCORER_FILE} computes a score that disagrees with its metadata (edited by hand?): run aae-run "
                         "calibrate again, or export again")


def _check_graphs(encoder, decoder, meta: ModelMetadata) -> None:
    """The graphs' names and shapes must agree with each other and with the metadata."""
    enc_in = {i.name: i.shape for i in encoder.get_inputs()}
    enc_out = {o.name: o.shape for o in encoder.get_outputs()}
    dec_in = {i.name: i.shape for i in decoder.get_inputs()}
    dec_out = {o.name for o in decoder.get_outputs()}
    listed = meta.graphs
    if set(enc_in) != set(listed["encoder"]["inputs"]) or not set(listed["encoder"]["outputs"]) <= set(enc_out) \
            or IMAGE_INPUT not in enc_in or LATENT_OUTPUT not in enc_out:
        raise ModelError(f"{ENCODER_FILE} does not have the inputs {listed['encoder']['inputs']} and outputs "
                         f"{listed['encoder']['outputs']} its metadata lists: re-export the model")
    if set(dec_in) != set(listed["decoder"]["inputs"]) or not set(listed["decoder"]["outputs"]) <= dec_out \
            or LATENT_INPUT not in dec_in or RECONSTRUCTION_OUTPUT not in dec_out:
        raise ModelError(f"{DECODER_FILE} does not have the inputs {listed['decoder']['inputs']} and outputs "
                         f"{listed['decoder']['outputs']} its metadata lists: re-export the model")
    if list(enc_in[IMAGE_INPUT][1:]) != list(meta.preprocessing.shape):
        raise ModelError(f"{ENCODER_FILE} takes {enc_in[IMAGE_INPUT][1:]} images but its metadata says {list(meta.preprocessing.shape)}")
    for name, dim in ((ENCODER_FILE, enc_out[LATENT_OUTPUT][-1]), (DECODER_FILE, dec_in[LATENT_INPUT][-1])):
        if dim != meta.latent_dim:
            raise ModelError(f"{name} has latent size {dim}, the metadata says {meta.latent_dim}: the encoder and decoder do not belong together")
    k = len(meta.classes) if meta.classes else None
    for name, dim in ((ENCODER_FILE, enc_out.get(CLASS_OUTPUT, [None])[-1]), (DECODER_FILE, dec_in.get(LABEL_INPUT, [None])[-1])):
        if dim is not None and dim != k:
            raise ModelError(f"{name} has {dim} classes, its metadata names {k}: re-export the model")
